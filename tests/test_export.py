"""CTranslate2 export: the exported model scores and decodes like ours."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import transformer.search
import transformer.stepper
from tests.conftest import tiny_model, toy_text, train_copy_model
from transformer.checkpoint import atomic_save
from transformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Config,
    ConfigError,
    DecodingConfig,
    TokenizerConfig,
)
from transformer.embeddings import TokenEmbedding
from transformer.export import (
    ExportedModel,
    export_model,
    main,
    translate_with_ctranslate2,
)
from transformer.export.writer import quantization_name
from transformer.inference import translate
from transformer.models import Transformer
from transformer.search import decode_corpus, max_lengths
from transformer.tokenizer import Tokenizer

ctranslate2 = pytest.importorskip(
    "ctranslate2", reason="ctranslate2 not installed: pip install -e '.[export]'"
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# one model each; together they cover pre- and post-norm, tied and untied embeddings,
# joint and separate vocabularies, both kinds of positions and every activation
VARIANTS = {
    "post-norm, all tied, joint": dict(norm_first=False),
    "pre-norm, untied output, learned positions, gelu": dict(
        norm_first=True,
        tie_output_embeddings=False,
        positional="learned",
        activation="gelu",
    ),
    "pre-norm, untied source/target, silu": dict(
        norm_first=True, tie_src_tgt_embeddings=False, activation="silu"
    ),
    "post-norm, separate vocabularies": dict(
        norm_first=False, tie_src_tgt_embeddings=False, tie_output_embeddings=False
    ),
}
GREEDY = DecodingConfig(strategy="greedy", max_len_a=1.5, max_len_b=6)


# out of the fast lane (-m 'not slow'): CTranslate2 exports of toy models (~25 s)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@dataclass
class Exported:
    model: Transformer
    tokenizer: Tokenizer
    ct2: ExportedModel  # as used: never emits <pad>/<bos>
    exact: ExportedModel  # without that mask: our log-probabilities exactly


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    """A joint model, and separate ones whose target side has fewer letters."""
    src, tgt = toy_text("copy", "train"), toy_text("reverse", "train", letters=10)
    tokenizers = {
        "joint": Tokenizer.train(TokenizerConfig(vocab_size=40), src, []),
        "separate": Tokenizer.train(
            TokenizerConfig(vocab_size=40, joint=False), src, tgt
        ),
    }
    separate = tokenizers["separate"]
    assert separate.src_vocab_size != separate.tgt_vocab_size
    return tokenizers


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tokenizers, tmp_path_factory) -> Exported:
    """A partly trained model and its export.

    60 updates of the copy task: outputs follow the input and end at different
    lengths, but the model is far from sure, so beam search has choices to make.
    """
    tokenizer = tokenizers["separate" if "separate" in request.param else "joint"]
    model = train_copy_model(
        60,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        **VARIANTS[request.param],
    )
    out = export_model(model, tokenizer, tmp_path_factory.mktemp("export") / "ct2")
    return Exported(
        model,
        tokenizer,
        ExportedModel(out, intra_threads=1),
        ExportedModel(out, intra_threads=1, suppress_specials=False),
    )


def sources(tokenizer: Tokenizer) -> list[list[int]]:
    """Source ids of 1 to 9 pieces (the model was trained on 3 to 8), unseen."""
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(4, tokenizer.src_vocab_size, (n,), generator=g).tolist()
        for n in (3, 7, 1, 8, 5, 9, 6, 4, 2, 5)
    ]


def limits(srcs: list[list[int]], cfg: DecodingConfig) -> list[int]:
    """Our length limit of each source: tokens with the forced <eos>."""
    padded = [torch.tensor([*s, EOS_ID] + [PAD_ID] * (20 - len(s))) for s in srcs]
    positions = torch.full((len(srcs),), 1024)
    return max_lengths(torch.stack(padded), cfg, positions).tolist()


def tokens(results) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in results]


@pytest.mark.slow
def test_export_holds_our_weights_and_positions(exported):
    """CTranslate2's teacher-forced log-probabilities equal ours."""
    tokenizer = exported.tokenizer
    srcs = sources(tokenizer)
    tgts = [
        [4 + (i * 7 + j) % (tokenizer.tgt_vocab_size - 4) for j in range(len(s) + 2)]
        for i, s in enumerate(srcs)
    ]
    scored = exported.ct2.translator.score_batch(
        [[tokenizer.src.id_to_piece(i) for i in s] for s in srcs],
        [tokenizer.tgt_pieces(t) for t in tgts],
    )
    for src, tgt, result in zip(srcs, tgts, scored, strict=True):
        logits = exported.model(
            torch.tensor([[*src, EOS_ID]]), torch.tensor([[BOS_ID, *tgt]])
        )
        logp = torch.log_softmax(logits[0], -1)  # (T + 1, V)
        ours = logp.gather(1, torch.tensor([*tgt, EOS_ID])[:, None]).squeeze(1)
        torch.testing.assert_close(
            torch.tensor(result.log_probs), ours, atol=1e-4, rtol=0
        )


def test_greedy_output_equals_ours(exported):
    tokenizer, srcs = exported.tokenizer, sources(exported.tokenizer)
    ours = decode_corpus(exported.model, srcs, GREEDY, CPU)
    assert tokens(exported.ct2.decode(srcs, GREEDY)) == tokens(ours)
    # not trivial: outputs end at different lengths, most of them by <eos>
    lengths = [len(hyps[0].tokens) for hyps in ours]
    ended = [n < m - 1 for n, m in zip(lengths, limits(srcs, GREEDY), strict=True)]
    assert len(set(lengths)) >= 3 and sum(ended) >= 8
    # the plain CTranslate2 call of docs/how-to/ctranslate2.md gives the same pieces
    # (it has no per-sentence length limit: compare the sentences that ended by <eos>)
    raw = exported.ct2.translator.translate_batch(
        [[tokenizer.src.id_to_piece(i) for i in s] for s in srcs],
        beam_size=1,
        min_decoding_length=0,
        max_decoding_length=exported.model.cfg.max_positions,
        suppress_sequences=[["<pad>"], ["<s>"]],
    )
    for result, hyps, end in zip(raw, ours, ended, strict=True):
        if end:
            assert result.hypotheses[0] == tokenizer.tgt_pieces(hyps[0].tokens)


def test_a_minimum_length_as_ours_up_to_the_length_limit(exported, caplog, monkeypatch):
    srcs = sources(exported.tokenizer)
    # 14 tokens: beyond the limits of the 1- and 2-piece sources (13 and 14 tokens
    # with <eos>), which end at their limit; the others have 14 tokens or more
    cfg = DecodingConfig(strategy="greedy", min_len=14)
    lim = limits(srcs, cfg)
    assert sorted(lim)[:3] == [13, 14, 16]
    ours = decode_corpus(exported.model, srcs, cfg, CPU)
    monkeypatch.setattr(transformer.stepper, "_warned_min_len", False)
    theirs = exported.ct2.decode(srcs, cfg)
    assert tokens(theirs) == tokens(ours)
    lengths = [len(h[0].tokens) for h in ours]
    assert all(n >= min(14, m - 1) for n, m in zip(lengths, lim, strict=True))
    assert sorted(n for n, m in zip(lengths, lim, strict=True) if m <= 14) == [12, 13]
    assert "decoding.min_len=14 is beyond the length limit" in caplog.text
    with pytest.raises(ConfigError, match="min_len: 9999 must be below the model"):
        exported.ct2.decoding_config(min_len=9999)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_output_equals_ours(exported, alpha):
    """Beam 5: the same best hypotheses, and with alpha 0 the same 5-best lists.

    Run without the <pad>/<bos> mask, with which CTranslate2 renormalises the
    log-probabilities around those tokens: these barely trained models give them up
    to a few percent, which is enough to swap nearly tied beams (trained ones give
    them almost nothing). Scores are compared where the hypothesis ended by <eos>
    (at the length limit ours adds the forced <eos>, CTranslate2 stops before it).
    """
    srcs = sources(exported.tokenizer)
    cfg = DecodingConfig(
        strategy="beam", beam_size=5, nbest=5, length_penalty=alpha, max_len_b=6
    )
    ours = decode_corpus(exported.model, srcs, cfg, CPU)
    theirs = exported.exact.decode(srcs, cfg)
    assert [h[0] for h in tokens(theirs)] == [h[0] for h in tokens(ours)]
    ended = 0
    for a, b, limit in zip(ours, theirs, limits(srcs, cfg), strict=True):
        # on either side, a hypothesis cut by the limit scores differently (ours
        # pays for the forced <eos>): it may enter one n-best list and not the other
        if max(len(h.tokens) for h in a + b) < limit - 1:
            ended += 1
            if alpha == 0.0:  # plain log-probabilities: the 5-best lists agree
                assert [h.tokens for h in b] == [h.tokens for h in a]
            assert abs(a[0].score - b[0].score) < 1e-4
    assert ended >= 7
    greedy = tokens(decode_corpus(exported.model, srcs, GREEDY, CPU))
    assert [h[0] for h in tokens(ours)] != [h[0] for h in greedy]  # beam mattered


class _CountingTranslator:
    """A ctranslate2.Translator that counts its translate_batch calls."""

    def __init__(self, translator) -> None:
        self.translator, self.batches = translator, []

    def translate_batch(self, source, **options):
        self.batches.append(len(source))
        return self.translator.translate_batch(source, **options)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_one_padded_batch_equals_ours(exported, monkeypatch, strategy):
    """With one length limit for every source (max_len_a 0), CTranslate2 decodes
    sources of 1 to 9 pieces in one padded batch: the best hypotheses still equal
    ours (unmasked, as above; alpha 0, where no length penalty is approximated)."""
    srcs = sources(exported.tokenizer)
    cfg = DecodingConfig(
        strategy=strategy, beam_size=5, length_penalty=0.0, max_len_a=0, max_len_b=16
    )
    assert len(set(limits(srcs, cfg))) == 1 and len({len(s) for s in srcs}) == 9
    counting = _CountingTranslator(exported.exact.translator)
    monkeypatch.setattr(exported.exact, "translator", counting)
    theirs = exported.exact.decode(srcs, cfg)
    assert counting.batches == [len(srcs)]
    ours = decode_corpus(exported.model, srcs, cfg, CPU)
    # where a hypothesis runs to the limit, ours adds the forced <eos>, and these
    # barely trained models repeat themselves there with nearly tied beams, which
    # padding's rounding can swap: compare the sentences that ended by <eos>
    limit = limits(srcs, cfg)[0]
    ended = [
        (a[0], b[0])
        for a, b in zip(ours, theirs, strict=True)
        if len(a[0].tokens) < limit - 1
    ]
    assert len(ended) >= 5 and len({len(a.tokens) for a, _ in ended}) >= 3
    for a, b in ended:
        assert a.tokens == b.tokens
        assert abs(a.score - b.score) < 1e-4


def test_masked_beam_search_never_emits_specials(exported):
    srcs = sources(exported.tokenizer)
    cfg = DecodingConfig(strategy="beam", beam_size=5, nbest=5, max_len_b=6)
    for hyps in exported.ct2.decode(srcs, cfg):
        assert len({tuple(h.tokens) for h in hyps}) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert not {PAD_ID, BOS_ID, EOS_ID} & {t for h in hyps for t in h.tokens}


def test_text_translation_equals_ours(exported):
    sentences = toy_text("copy", "val")
    cfg = DecodingConfig(strategy="beam", beam_size=4, length_penalty=0.6)
    ours = translate(exported.model, exported.tokenizer, sentences, cfg, CPU)
    theirs = exported.exact.translate(sentences, cfg)
    assert [t[0].text for t in theirs] == [t[0].text for t in ours]
    assert len({t[0].text for t in ours}) > 1


def test_translate_with_ctranslate2_uses_the_export_defaults(exported):
    model, tokenizer, export_dir = exported.model, exported.tokenizer, exported.ct2.dir
    sentences = toy_text("copy", "val")[:4]
    defaults = exported.ct2.decoding_config()  # the model's DecodingConfig
    assert (defaults.strategy, defaults.beam_size) == ("beam", 5)
    nbest = translate_with_ctranslate2(export_dir, sentences, nbest=3, intra_threads=1)
    assert [len(t) for t in nbest] == [3] * len(sentences)
    got = translate_with_ctranslate2(
        export_dir, sentences, beam_size=1, intra_threads=1
    )
    greedy = DecodingConfig(strategy="greedy")  # with the default length limits
    ours = translate(model, tokenizer, sentences, greedy, CPU)
    assert [t[0].text for t in got] == [t[0].text for t in ours]
    assert [t[0].tokens for t in got] == [t[0].tokens for t in ours]
    # never fewer hypotheses than asked for without a word
    with pytest.raises(ValueError, match="several hypotheses need beam search"):
        translate_with_ctranslate2(export_dir, sentences, beam_size=1, nbest=3)
    with pytest.raises(ValueError, match="nbest=4 is more than beam_size=2"):
        translate_with_ctranslate2(export_dir, sentences, beam_size=2, nbest=4)
    with pytest.raises(ValueError, match="nbest=0: must be >= 1"):
        translate_with_ctranslate2(export_dir, sentences, beam_size=1, nbest=0)


def test_the_export_folder_describes_itself(exported):
    export_dir, tokenizer = exported.ct2.dir, exported.tokenizer
    files = {p.name for p in export_dir.iterdir()}
    assert {"model.bin", "config.json", "export.json"} <= files
    info = json.loads((export_dir / "export.json").read_text())
    config = json.loads((export_dir / "config.json").read_text())
    assert config["add_source_eos"] is True and config["add_source_bos"] is False
    assert config["decoder_start_token"] == config["bos_token"] == "<s>"
    assert (config["unk_token"], config["eos_token"]) == ("<unk>", "</s>")
    assert config["layer_norm_epsilon"] == 1e-5
    assert info["special_tokens"]["pad"] == {"id": PAD_ID, "piece": "<pad>"}
    assert info["max_positions"] == exported.model.cfg.max_positions
    if tokenizer.joint:
        assert {"shared_vocabulary.json", "spm.model"} <= files
    else:
        assert {"source_vocabulary.json", "target_vocabulary.json"} <= files
        assert {"spm.src.model", "spm.tgt.model"} <= files
        target = json.loads((export_dir / "target_vocabulary.json").read_text())
        assert target == tokenizer.tgt_pieces(list(range(tokenizer.tgt_vocab_size)))


def test_int8_export_holds_int8_weights_and_decodes(tokenizers, tmp_path):
    """int8 weights are ours rounded per row; the int8 model decodes."""
    tokenizer = tokenizers["joint"]
    model = train_copy_model(60, vocab=tokenizer.src_vocab_size)
    fp32 = export_model(model, tokenizer, tmp_path / "fp32")
    int8 = export_model(model, tokenizer, tmp_path / "int8", quantization="int8")
    size = {p.name: (p / "model.bin").stat().st_size for p in (fp32, int8)}
    assert size["int8"] < size["fp32"] / 2
    assert json.loads((int8 / "export.json").read_text())["quantization"] == "int8"
    # CTranslate2's int8: each row of a matrix scaled to [-127, 127] and rounded
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, (torch.nn.Linear, TokenEmbedding)):
                w = module.weight
                scale = 127 / w.abs().amax(1, keepdim=True).clamp(min=1e-30)
                w.copy_((w * scale).round() / scale)
    # in float32 compute the weights are dequantized: the rounded model's numbers
    dequantized = ctranslate2.Translator(
        str(int8), compute_type="float32", intra_threads=1
    )
    srcs = sources(tokenizer)
    tgts = [
        [4 + (i + j) % (tokenizer.tgt_vocab_size - 4) for j in range(6)]
        for i in range(len(srcs))
    ]
    scored = dequantized.score_batch(
        [[tokenizer.src.id_to_piece(i) for i in s] for s in srcs],
        [tokenizer.tgt_pieces(t) for t in tgts],
    )

    @torch.no_grad()
    def gap(m: Transformer) -> float:
        """The largest difference between CTranslate2's and ``m``'s scores."""
        worst = 0.0
        for src, tgt, result in zip(srcs, tgts, scored, strict=True):
            logits = m(torch.tensor([[*src, EOS_ID]]), torch.tensor([[BOS_ID, *tgt]]))
            logp = torch.log_softmax(logits[0], -1)
            ours = logp.gather(1, torch.tensor([*tgt, EOS_ID])[:, None]).squeeze(1)
            diff = (torch.tensor(result.log_probs) - ours).abs().max()
            worst = max(worst, diff.item())
        return worst

    # a weight on a rounding boundary may round the other way (up to ~3e-4 here,
    # by the threads that trained the model); unrounded weights are ~100x off
    assert gap(rounded) < 2e-3 < 1e-2 < gap(model)
    # int8 compute also quantizes activations: outputs are valid, not always ours
    quantized = ExportedModel(int8, intra_threads=1)
    assert quantized.translator.compute_type.startswith("int8")
    results = quantized.decode(srcs, GREEDY)
    assert {len(hyps[0].tokens) for hyps in results} != {0}
    for hyps in results:
        assert not {PAD_ID, BOS_ID, EOS_ID} & set(hyps[0].tokens)


# --- the command line ---


@pytest.fixture
def checkpoint(tokenizers, tmp_path) -> Path:
    tokenizer = tokenizers["joint"]
    size = tokenizer.src_vocab_size
    model = tiny_model(src_vocab_size=size, tgt_vocab_size=size)
    path = tmp_path / "model.pt"
    atomic_save(
        {
            "format": 1,
            "model": model.state_dict(),
            "config": Config(model=model.cfg).to_dict(),
            "tokenizer": tokenizer.state_dict(),
            "step": 7,
        },
        path,
    )
    return path


def test_a_half_checkpoint_exports_half_unless_asked(checkpoint, tmp_path, caplog):
    """A published file written with --half stays half the size in CTranslate2
    (float16 weights, run in float32 on CPU) and decodes like the float32 one."""
    caplog.set_level(logging.INFO)
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"] = {k: v.half() for k, v in ckpt["model"].items()}
    half = tmp_path / "half.pt"
    atomic_save(ckpt, half)
    sizes, outputs = {}, {}
    for name, source, extra in (
        ("full", checkpoint, []),
        ("half", half, []),
        ("asked", half, ["--quantization", "float32"]),
    ):
        out = tmp_path / name
        assert main(["--checkpoint", str(source), "--output", str(out), *extra]) == 0
        info = json.loads((out / "export.json").read_text())
        sizes[name] = (out / "model.bin").stat().st_size
        outputs[name] = ExportedModel(out, intra_threads=1).decode([[5, 6, 7]], GREEDY)
        expected = {"full": None, "half": "float16", "asked": "float32"}[name]
        assert info["quantization"] == expected
    assert "holds float16 weights: exporting float16" in caplog.text
    assert sizes["half"] < 0.6 * sizes["full"] and sizes["asked"] > 0.9 * sizes["full"]
    tokens = {name: [h[0].tokens for h in out] for name, out in outputs.items()}
    assert tokens["half"] == tokens["asked"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_exports_and_replaces_only_with_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "ct2"
    args = ["--checkpoint", str(checkpoint), "--output", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    info = json.loads((out / "export.json").read_text())
    assert (info["step"], info["quantization"]) == (7, None)
    assert main(args) == 2
    assert "already exists; pass --force" in error_line(capsys)
    assert main([*args, "--force", "--quantization", "int8_float32"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["quantization"] == "int8_float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "model.pt"]
    ExportedModel(out, intra_threads=1).decode([[5, 6]], GREEDY)
    # this toolkit's short names are CTranslate2's long ones
    assert main([*args, "--force", "--quantization", "int8_bf16"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["quantization"] == "int8_bfloat16"
    assert [quantization_name(q) for q in ("bf16", "fp16", "int8", None)] == [
        "bfloat16",
        "float16",
        "int8",
        None,
    ]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    args = ["--checkpoint", str(checkpoint), "--output", str(other), "--force"]
    assert main(args) == 2
    assert "not an earlier export" in error_line(capsys)
    assert (other / "keep.txt").read_text() == "mine"


def test_cli_user_errors_print_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "ct2")
    assert main(["--checkpoint", str(tmp_path / "none.pt"), "--output", out]) == 2
    assert "checkpoint not found" in error_line(capsys)
    bad = ["--checkpoint", str(checkpoint), "--output", out, "--quantization", "int3"]
    assert main(bad) == 2
    assert "--quantization int3: must be one of" in error_line(capsys)
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if not installed
    assert main(["--checkpoint", str(checkpoint), "--output", out]) == 2
    assert 'pip install -e ".[export]"' in error_line(capsys)
    assert not Path(out).exists()


@pytest.mark.slow
def test_script_wrapper_runs_the_cli(tmp_path):
    script = ROOT / "scripts" / "export.py"
    args = ["--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "o")]
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "not found" in result.stderr
