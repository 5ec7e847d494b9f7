"""Published models: ``transformer-average --weights-only [--half] [--weights ema]``
writes one set of weights with the config and tokenizer, which loads and decodes
like the full checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny
from transformer.checkpoint import load_checkpoint
from transformer.cli.evaluate import eval_main
from transformer.cli.train import average_main
from transformer.cli.translate import translate_main
from transformer.config import BOS_ID, EOS_ID, DataConfig
from transformer.data import read_pairs
from transformer.inference import load_model, translate
from transformer.training import Trainer

TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng", "epoch", "data_signature")


@pytest.fixture(scope="module")
def last(tmp_path_factory, toy_tokenizer):
    """A toy copy model trained with an EMA of its weights."""
    run = tmp_path_factory.mktemp("pub") / "run"
    cfg = tiny(run, toy_tokenizer, "training.max_steps=150", "training.ema_decay=0.95")
    Trainer(cfg).train()
    return run / "last.pt"


def publish(last, output, *options) -> dict:
    args = ["--inputs", str(last), "--output", str(output), "--weights-only"]
    assert average_main([*args, *options]) == 0
    return load_checkpoint(output)


@pytest.mark.slow
def test_half_weights_only_decodes_like_the_checkpoint(last, tmp_path, capsys):
    full32 = publish(last, tmp_path / "w32.pt")
    half = publish(last, tmp_path / "w16.pt", "--half")
    assert "float16 raw weights only" in capsys.readouterr().out
    for ckpt in (full32, half):
        assert not [k for k in (*TRAINING_ONLY, "ema") if k in ckpt]
        assert {"model", "config", "tokenizer"} <= ckpt.keys()
    assert {v.dtype for v in half["model"].values()} == {torch.float16}
    size = {p: (tmp_path / p).stat().st_size for p in ("w32.pt", "w16.pt")}
    assert size["w16.pt"] < size["w32.pt"] < 0.6 * last.stat().st_size

    def weight_bytes(ckpt):  # the SentencePiece model is most of a toy's file
        return sum(v.numel() * v.element_size() for v in ckpt["model"].values())

    assert weight_bytes(half) == weight_bytes(full32) / 2

    model, cfg, tokenizer, _ = load_model(last)
    small, _, _, _ = load_model(tmp_path / "w16.pt")
    assert {p.dtype for p in small.parameters()} == {torch.float32}
    pairs = read_pairs(DataConfig(format="copy", toy_valid_size=20), "valid")
    sentences = [s for s, _ in pairs]
    cpu = torch.device("cpu")
    full = translate(model, tokenizer, sentences, cfg.decoding, cpu)
    published = translate(small, tokenizer, sentences, cfg.decoding, cpu)
    assert [r[0].tokens for r in published] == [r[0].tokens for r in full]
    for a, b in zip(full, published, strict=True):
        assert b[0].score == pytest.approx(a[0].score, rel=2e-3, abs=1e-3)
    # not trivially: the (partly trained) model's outputs vary with the input
    assert len({r[0].text for r in full}) >= 15
    # and the command-line tools read it like any checkpoint
    assert translate_main(["--checkpoint", str(tmp_path / "w16.pt"), "-s", "a b"]) == 0
    report = tmp_path / "report.json"
    args = ["--checkpoint", str(tmp_path / "w16.pt"), "--split", "valid"]
    assert eval_main([*args, "--greedy", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["step"] == 150


@pytest.mark.slow
def test_ema_weights_only(last, tmp_path, capsys):
    ema = publish(last, tmp_path / "ema.pt", "--weights", "ema", "--half")
    saved = load_checkpoint(last)
    assert ema["weights"] == "ema" and "ema" not in ema
    for name, value in saved["ema"].items():
        assert torch.equal(ema["model"][name], value.half()), name
    assert not torch.equal(
        ema["model"]["tgt_embed.weight"], saved["model"]["tgt_embed.weight"].half()
    )
    # its weights already are the EMA: asking for the EMA of it is an error
    args = ["--checkpoint", str(tmp_path / "ema.pt"), "--weights", "ema", "-s", "a"]
    assert translate_main(args) == 2
    assert "already are the EMA" in capsys.readouterr().err


@pytest.mark.slow
def test_tied_weights_are_stored_once(last, tmp_path):
    """The tied source, target and output embeddings are one tensor in a published
    file, whichever weights it holds and in either dtype, and in an average."""
    cfg = load_checkpoint(last)["config"]["model"]
    assert cfg["tie_src_tgt_embeddings"] and cfg["tie_output_embeddings"]
    files = {
        "raw16": ("--half",),
        "ema16": ("--weights", "ema", "--half"),
        "ema32": ("--weights", "ema"),
    }
    for name, options in files.items():
        model = publish(last, tmp_path / f"{name}.pt", *options)["model"]
        src, tgt = model["src_embed.weight"], model["tgt_embed.weight"]
        assert src.untyped_storage().data_ptr() == tgt.untyped_storage().data_ptr()
        unique = {v.untyped_storage().data_ptr(): v for v in model.values()}
        stored = sum(v.numel() * v.element_size() for v in unique.values())
        assert stored < sum(v.numel() * v.element_size() for v in model.values())
        # and so does a file written again from the published one
        again = publish(tmp_path / f"{name}.pt", tmp_path / f"{name}_again.pt")
        src, tgt = (
            again["model"]["src_embed.weight"],
            again["model"]["tgt_embed.weight"],
        )
        assert src.untyped_storage().data_ptr() == tgt.untyped_storage().data_ptr()
    # an average of two inputs keeps the tie and its mean is the mean of each
    other = tmp_path / "other.pt"
    publish(last, other, "--weights", "ema")
    out = tmp_path / "avg.pt"
    assert average_main(["--inputs", str(last), str(other), "--output", str(out)]) == 0
    avg = load_checkpoint(out)["model"]
    raw, ema = load_checkpoint(last)["model"], load_checkpoint(other)["model"]
    assert avg["tgt_embed.weight"] is avg["src_embed.weight"] or (
        avg["tgt_embed.weight"].untyped_storage().data_ptr()
        == avg["src_embed.weight"].untyped_storage().data_ptr()
    )
    expected = (raw["tgt_embed.weight"].double() + ema["tgt_embed.weight"]) / 2
    assert torch.allclose(avg["tgt_embed.weight"].double(), expected, atol=1e-7)


@pytest.mark.slow
def test_average_keeps_the_ema_unless_weights_only(last, tmp_path):
    out = tmp_path / "avg.pt"
    assert average_main(["--inputs", str(last), "--output", str(out)]) == 0
    avg = load_checkpoint(out)
    saved = load_checkpoint(last)
    for key in ("model", "ema"):
        for name, value in saved[key].items():
            assert torch.equal(avg[key][name], value), (key, name)
    assert not [k for k in TRAINING_ONLY if k in avg]


@pytest.mark.slow
def test_export_reads_published_and_ema_weights(last, tmp_path):
    pytest.importorskip("ctranslate2", reason="ctranslate2 not installed")
    from transformer.export import EXPORT_INFO, export_checkpoint

    published = tmp_path / "w16.pt"
    publish(last, published, "--half")
    for source, weights, name in ((published, "raw", "a"), (last, "ema", "b")):
        out = export_checkpoint(source, tmp_path / name, weights=weights)
        info = json.loads((out / EXPORT_INFO).read_text())
        assert (info["checkpoint"], info["weights"]) == (str(source), weights)
        assert (out / "model.bin").stat().st_size > 0
    # transformer-export --weights ema exports the average, not the raw weights:
    # CTranslate2's scores of one pair are the EMA model's, not the raw model's
    from transformer.export import ExportedModel
    from transformer.export import main as export_main

    out = tmp_path / "ema_cli"
    args = ["--checkpoint", str(last), "--output", str(out), "--weights", "ema"]
    assert export_main(args) == 0
    src, tgt = [5, 6, 7, 8], [5, 6, 7, 8]
    translator = ExportedModel(out, intra_threads=1)
    tokenizer = load_model(last)[2]
    scored = translator.translator.score_batch(
        [[tokenizer.src.id_to_piece(i) for i in src]], [tokenizer.tgt_pieces(tgt)]
    )[0].log_probs
    for weights, same in (("ema", True), ("raw", False)):
        model = load_model(last, weights=weights)[0]
        logits = model(torch.tensor([[*src, EOS_ID]]), torch.tensor([[BOS_ID, *tgt]]))
        logp = torch.log_softmax(logits[0], -1)
        ours = logp.gather(1, torch.tensor([*tgt, EOS_ID])[:, None]).squeeze(1)
        close = torch.allclose(torch.tensor(scored), ours, atol=1e-4)
        assert close == same, weights
