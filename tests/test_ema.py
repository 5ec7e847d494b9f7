"""The moving average of the weights: its formula, exact resume, validation with
it, and decoding it (``--weights ema``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny, tiny_model
from transformer.checkpoint import CheckpointError, atomic_save, load_checkpoint
from transformer.cli.evaluate import eval_main
from transformer.cli.translate import translate_main
from transformer.config import ConfigError
from transformer.inference import load_model
from transformer.training import Trainer
from transformer.training.ema import EMA
from transformer.training.validation import evaluate_loss


@pytest.mark.parametrize("warmup", [False, True])
def test_update_follows_the_formula_in_float64(tmp_path, toy_tokenizer, warmup):
    cfg = tiny(
        tmp_path / "run",
        toy_tokenizer,
        "training.ema_decay=0.5",
        f"training.ema_decay_warmup={str(warmup).lower()}",
    )
    trainer = Trainer(cfg)
    reference = {k: v.double() for k, v in trainer.model.state_dict().items()}
    ranges = [range(0, 12), range(40, 47), range(100, 110), range(7, 20)] * 3
    for n, ids in enumerate(ranges):
        batch = trainer.train_data.collate(np.array(list(ids)))
        assert not trainer.train_step([batch]).skipped
        # with the warm-up: 0.1, 0.18, 0.25, ... then 0.5 from the 9th update
        decay = min(0.5, (1 + n) / (10 + n)) if warmup else 0.5
        for k, v in trainer.model.state_dict().items():
            reference[k] = decay * reference[k] + (1 - decay) * v.double()
    ema = trainer.ema.state_dict()
    assert ema.keys() == reference.keys()
    for k, v in ema.items():
        assert v.dtype == torch.float32, k
        torch.testing.assert_close(v.double(), reference[k], atol=1e-7, rtol=1e-6)
    # the average lags behind the weights (it is not just a copy of them)
    weights = trainer.model.state_dict()["tgt_embed.weight"]
    assert (ema["tgt_embed.weight"] - weights).abs().max() > 1e-4
    # tied embeddings are averaged once and saved as one tensor
    assert ema["src_embed.weight"] is ema["tgt_embed.weight"]


def test_applied_swaps_the_weights_in_and_back_exactly():
    model = tiny_model(0)
    ema = EMA(model, 0.5)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update()
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.state_dict()[k]), k
            expected = 0.5 * raw[k] + 0.5 * changed[k]
            torch.testing.assert_close(v, expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, changed[k]), k


def ema_run(run, tokenizer, steps: int, *extra):
    return tiny(
        run,
        tokenizer,
        f"training.max_steps={steps}",
        "training.validate_every=3",
        "training.ema_decay=0.9",
        "training.validate_ema=true",
        *extra,
    )


def test_resume_restores_the_ema_bit_exactly(tmp_path, toy_tokenizer):
    straight = Trainer(ema_run(tmp_path / "a", toy_tokenizer, 8))
    straight.train()
    Trainer(ema_run(tmp_path / "b", toy_tokenizer, 5)).train()
    mid = load_checkpoint(tmp_path / "b" / "last.pt")
    assert mid["step"] == 5 and "ema" in mid
    resumed = Trainer(ema_run(tmp_path / "b", toy_tokenizer, 8), resume=True)
    # the warm-up goes on from the step resumed (0.9 is reached at update 81): a
    # count restarted at 0 would give another average
    assert resumed.ema.updates == 5 and resumed.ema.current_decay() == 6 / 15
    for name, value in mid["ema"].items():
        assert torch.equal(resumed.ema.state_dict()[name], value), name
    resumed.train()
    a, b = straight.ema.state_dict(), resumed.ema.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # validating with the EMA weights left the trained weights as they were
    for (name, x), y in zip(
        straight.model.state_dict().items(),
        resumed.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(x, y), name
    saved = load_checkpoint(tmp_path / "b" / "last.pt")["ema"]
    for name in a:
        assert torch.equal(saved[name], a[name]), name
    assert not torch.equal(saved["tgt_embed.weight"], mid["ema"]["tgt_embed.weight"])


@pytest.mark.slow
def test_an_ema_begun_mid_run_resumes_with_its_own_count(tmp_path, toy_tokenizer):
    def run(name, steps, *extra):
        return Trainer(
            ema_run(tmp_path / name, toy_tokenizer, steps, *extra), resume=True
        ).train()

    for name in ("once", "twice"):  # 5 updates without an average, then with one
        run(name, 5, "training.ema_decay=0", "training.validate_ema=false")
    run("once", 11)
    run("twice", 8)
    middle = load_checkpoint(tmp_path / "twice" / "last.pt")
    assert middle["step"] == 8 and middle["ema_updates"] == 3
    run("twice", 11)
    once = load_checkpoint(tmp_path / "once" / "last.pt")
    twice = load_checkpoint(tmp_path / "twice" / "last.pt")
    assert once["ema_updates"] == twice["ema_updates"] == 6
    for name, value in once["ema"].items():
        assert torch.equal(twice["ema"][name], value), name


def test_an_average_saved_before_warm_ups_goes_on_without(tmp_path, toy_tokenizer):
    Trainer(ema_run(tmp_path / "run", toy_tokenizer, 4)).train()
    last = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(last)
    del ckpt["ema_updates"], ckpt["ema_warmup"]  # as code before warm-ups wrote it
    atomic_save(ckpt, last)
    resumed = Trainer(ema_run(tmp_path / "run", toy_tokenizer, 6), resume=True)
    assert not resumed.ema.warmup and resumed.ema.current_decay() == 0.9
    resumed.train()  # and the next resume still goes on without one
    again = Trainer(ema_run(tmp_path / "run", toy_tokenizer, 8), resume=True)
    assert not again.ema.warmup and again.ema.current_decay() == 0.9
    assert load_checkpoint(last)["ema_warmup"] is False
    ckpt["ema_updates"] = "4"
    atomic_save(ckpt, last)
    with pytest.raises(CheckpointError, match="ema_updates is '4', not a count"):
        Trainer(ema_run(tmp_path / "run", toy_tokenizer, 6), resume=True)


def test_validation_uses_the_ema_weights(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    # float32 throughout, so that the logged loss can be recomputed exactly
    trainer = Trainer(ema_run(run, toy_tokenizer, 6, "training.precision=fp32"))
    trainer.train()
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["type"] == "valid"][-1]
    assert logged["step"] == 6

    def loss(weights: str) -> float:
        model, _, _, _ = load_model(run / "last.pt", weights=weights)
        cpu = torch.device("cpu")
        (valid,) = trainer.valid  # one direction: one validation set
        return evaluate_loss(model, valid.corpus, 256, cpu, "fp32")["loss"]

    assert logged["loss"] == pytest.approx(loss("ema"), rel=1e-6)
    assert abs(logged["loss"] - loss("raw")) > 1e-4


def test_decoding_the_ema_weights(tmp_path, toy_tokenizer, capsys):
    run = tmp_path / "run"
    Trainer(ema_run(run, toy_tokenizer, 6)).train()
    last = run / "last.pt"
    raw, _, _, ckpt = load_model(last)
    ema, _, _, _ = load_model(last, weights="ema")
    for name, value in ema.state_dict().items():
        assert torch.equal(value, ckpt["ema"][name]), name
    src = torch.tensor([[5, 6, 7, 3]])
    tgt = torch.tensor([[2, 5, 6]])
    assert not torch.allclose(raw(src, tgt), ema(src, tgt))
    args = ["--checkpoint", str(last), "--weights", "ema"]
    assert translate_main([*args, "-s", "a"]) == 0
    report = tmp_path / "report.json"
    assert eval_main([*args, "--split", "val", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["weights"] == "ema" and data["hypotheses"].endswith(".ema.val.hyp")


def test_serving_the_ema_weights(tmp_path, toy_tokenizer, capsys):
    pytest.importorskip("uvicorn", reason="the .[serve] extra (uvicorn) is missing")
    from transformer.serve import main as serve_main
    from transformer.serve.models import load_models

    run = tmp_path / "run"
    Trainer(ema_run(run, toy_tokenizer, 3)).train()
    last = run / "last.pt"
    ema = load_checkpoint(last)["ema"]
    (served,) = load_models([last], torch.device("cpu"), "fp32", weights="ema")
    for name, value in served.model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    # a checkpoint without them: the CLI's clear error, before any server starts
    plain = tmp_path / "plain"
    Trainer(tiny(plain, toy_tokenizer, "training.max_steps=1")).train()
    args = ["--checkpoint", str(plain / "last.pt"), "--weights", "ema"]
    assert serve_main(args) == 2
    err = capsys.readouterr().err
    assert "holds no EMA weights" in err and "Traceback" not in err


def test_ema_of_a_checkpoint_without_one_is_a_clear_error(
    tmp_path, toy_tokenizer, capsys
):
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=1")).train()
    last = run / "last.pt"
    assert "ema" not in load_checkpoint(last)
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        load_model(last, weights="ema")
    args = ["--checkpoint", str(last), "--weights", "ema"]
    assert translate_main([*args, "-s", "a"]) == 2
    err = capsys.readouterr().err
    assert f"{last}: holds no EMA weights" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["training.ema_decay=1.0"], "training.ema_decay"),
        (["training.ema_decay=-0.1"], "training.ema_decay"),
        (["training.validate_ema=true"], "training.validate_ema"),
        (["training.init_weights=ema"], "training.init_weights"),
        (["training.init_from="], "training.init_from"),
    ],
)
def test_config_checks(tmp_path, toy_tokenizer, overrides, key):
    with pytest.raises(ConfigError, match=rf"command line: {key}: "):
        tiny(tmp_path, toy_tokenizer, *overrides)
    ok = tiny(tmp_path, toy_tokenizer, "training.ema_decay=0.999")
    assert ok.training.ema_decay == 0.999 and not ok.training.validate_ema
