"""Training: loss, schedule, accumulation, checkpoints, exact resume, signals, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import (
    SMALL,
    TOY,
    needs_torchrun,
    tiny,
    torchrun,
    train_command,
    wait_for_rows,
)
from transformer.averaging import average_checkpoints
from transformer.checkpoint import CheckpointError, atomic_save, load_checkpoint
from transformer.config import ConfigError, load_config
from transformer.inference import load_model
from transformer.training import (
    Trainer,
    label_smoothed_loss,
    lr_factor,
    train,
)


def test_label_smoothing_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    target = torch.tensor([[4, 5, 0], [6, 0, 0]])  # 0 = pad
    eps = 0.1
    expected = 0.0
    for b in range(2):
        for t in range(3):
            if target[b, t] == 0:
                continue
            logp = torch.log_softmax(logits[b, t], -1)
            smooth = torch.full((7,), eps / 7, dtype=torch.float64)
            smooth[target[b, t]] += 1 - eps
            expected -= (smooth * logp).sum().item()
    got = label_smoothed_loss(logits, target, eps).item()
    assert math.isclose(got, expected, rel_tol=1e-6)


def test_noam_and_inverse_sqrt_schedules():
    cfg = load_config(
        TOY,
        [
            "training.schedule=noam",
            "training.lr=2e-3",  # the peak, written as users write it
            "training.warmup_steps=100",
            "model.d_model=64",
        ],
    )

    def paper(step):  # d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
        return 64**-0.5 * min(step**-0.5, step * 100**-1.5)

    for step in (1, 50, 100, 400):
        assert math.isclose(lr_factor(step, cfg), 2e-3 * paper(step) / paper(100))
    assert max(lr_factor(s, cfg) for s in range(1, 1000)) == lr_factor(100, cfg)
    assert math.isclose(lr_factor(100, cfg), 2e-3)
    cfg = load_config(
        TOY,
        [
            "training.schedule=inverse_sqrt",
            "training.lr=0.001",
            "training.warmup_steps=100",
        ],
    )
    assert math.isclose(lr_factor(50, cfg), 0.0005)
    assert math.isclose(lr_factor(100, cfg), 0.001)
    assert math.isclose(lr_factor(400, cfg), 0.0005)


def test_cooldown_decays_linearly_to_the_last_update():
    base = ["training.schedule=inverse_sqrt", "training.lr=0.001"]
    base += ["training.warmup_steps=100", "training.max_steps=1000"]
    plain = load_config(TOY, base)
    cool = load_config(TOY, [*base, "training.cooldown_steps=400"])
    # untouched up to max_steps - cooldown: a run resumed there with the cool-down
    # switched on follows the schedule of one started with it
    for step in (1, 50, 100, 400, 600):
        assert lr_factor(step, cool) == lr_factor(step, plain)
    for step in (601, 700, 800, 1000):
        expected = 0.001 * math.sqrt(100 / step) * (1000 - step + 1) / 400
        assert math.isclose(lr_factor(step, cool), expected)
    assert lr_factor(1001, cool) == 0.0
    with pytest.raises(ConfigError, match="training.cooldown_steps"):
        load_config(TOY, [*base, "training.cooldown_steps=1001"])


def test_accumulation_equals_one_large_batch(tmp_path, toy_tokenizer):
    # float32: the sums are compared to 1e-6, below bf16's rounding
    overrides = ["model.dropout=0.0", "training.precision=fp32"]
    trainer = Trainer(tiny(tmp_path / "run", toy_tokenizer, *overrides))
    first, second = list(range(0, 12)), list(range(40, 47))

    def batch(ids):
        return trainer.train_data.collate(np.array(ids))

    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    two = trainer.train_step([batch(first), batch(second)])
    grads_two = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.load_state_dict(initial)
    one = trainer.train_step([batch(first + second)])
    grads_one = [p.grad.clone() for p in trainer.model.parameters()]
    assert one.tokens == two.tokens and not one.skipped and not two.skipped
    assert math.isclose(one.loss, two.loss, rel_tol=1e-5)
    for a, b in zip(grads_one, grads_two, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_resume_is_bit_identical(tmp_path, toy_tokenizer):
    straight = Trainer(
        tiny(
            tmp_path / "a",
            toy_tokenizer,
            "training.max_steps=8",
            "training.validate_every=3",
        )
    )
    straight.train()
    first = Trainer(
        tiny(
            tmp_path / "b",
            toy_tokenizer,
            "training.max_steps=5",
            "training.validate_every=3",
        )
    )
    first.train()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 5
    resumed = Trainer(
        tiny(
            tmp_path / "b",
            toy_tokenizer,
            "training.max_steps=8",
            "training.validate_every=3",
        ),
        resume=True,
    )
    assert resumed.step == 5
    resumed.train()
    for (name, a), b in zip(
        straight.model.state_dict().items(),
        resumed.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    # and not trivially: the run actually changed the weights
    fresh = Trainer(tiny(tmp_path / "c", toy_tokenizer, "training.max_steps=1"))
    assert not torch.equal(fresh.model.tgt_embed.weight, resumed.model.tgt_embed.weight)


@pytest.mark.slow
def test_sigterm_saves_last_and_resume_continues(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    args = train_command(
        run,
        toy_tokenizer,
        f"data.cache_dir={tmp_path / 'cache'}",
        "training.max_steps=100000",
    )
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    wait_for_rows(metrics, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    step = load_checkpoint(run / "last.pt")["step"]
    assert step >= 3
    assert not list(run.glob(".*.tmp"))
    trainer = Trainer(tiny(run, toy_tokenizer, f"training.max_steps={step + 2}"))
    assert trainer.step == step
    trainer.train()
    assert load_checkpoint(run / "last.pt")["step"] == step + 2


def test_atomic_save_never_leaves_a_broken_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"x": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "tokenizer": Payload()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as e:
        load_checkpoint(path)
    assert "system" in str(e.value) and "safe load refuses" in str(e.value)
    assert "weights_only" not in str(e.value)  # no advice to load it unsafely
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt: .*not a file written by"):
        load_checkpoint(tmp_path / "junk.pt")


def test_incompatible_config_is_a_clear_error(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=1")).train()
    with pytest.raises(
        CheckpointError, match=r"model\.d_model: checkpoint 32, config 64"
    ):
        Trainer(tiny(run, toy_tokenizer, "model.d_model=64"), resume=True)


def test_checkpoint_describes_itself(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=2")).train()
    ckpt = load_checkpoint(run / "last.pt")
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "step",
        "epoch",
        "batch_in_epoch",
        "best_score",
        "config",
        "tokenizer",
    ):
        assert key in ckpt, key
    model, cfg, tokenizer, _ = load_model(run / "last.pt")
    assert (
        cfg.model.d_model == 32 and tokenizer.src_vocab_size == cfg.model.src_vocab_size
    )
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
    assert (run / "curves.png").stat().st_size > 1000


def test_average_checkpoints(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    Trainer(
        tiny(run, toy_tokenizer, "training.max_steps=4", "training.save_every=2")
    ).train()
    paths = [run / "step_2.pt", run / "step_4.pt"]
    out = average_checkpoints(paths, tmp_path / "avg.pt")
    a, b = (load_checkpoint(p)["model"] for p in paths)
    averaged = load_checkpoint(out)
    avg = averaged["model"]
    for k in avg:
        torch.testing.assert_close(avg[k], (a[k] + b[k]) / 2)
    assert averaged["step"] == 4 and averaged["averaged_steps"] == [2, 4]


@pytest.mark.slow
def test_toy_copy_config_learns(tmp_path):
    cfg = load_config(
        TOY,
        [
            f"training.run_dir={tmp_path / 'toy'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "training.max_steps=300",
            "training.validate_every=300",
        ],
    )
    best = train(cfg)
    ckpt = load_checkpoint(best)
    assert ckpt["best_score"] >= 0.95  # validation token accuracy
    rows = (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()
    assert '"bleu"' in rows[-1]


@pytest.mark.slow
@needs_torchrun
def test_two_process_gloo_matches_single_process(tmp_path, toy_tokenizer):
    common = [
        f"data.tokenizer.model={toy_tokenizer}",
        f"data.cache_dir={tmp_path / 'c'}",
        *SMALL,
        "model.dropout=0.0",
        "training.max_steps=3",
        "training.device=cpu",
        "training.precision=fp32",  # compared to 1e-5, below bf16's rounding
    ]
    out = tmp_path / "out"
    torchrun(tmp_path, out, tmp_path / "ddp", *common)
    rank0 = torch.load(out / "rank0.pt", weights_only=True)["model"]
    rank1 = torch.load(out / "rank1.pt", weights_only=True)["model"]
    single = Trainer(
        load_config(
            TOY,
            [f"training.run_dir={tmp_path / 'one'}", "training.accumulate=2", *common],
        )
    )
    single.train()

    # loss and gradient norm per step are scale-sensitive (Adam's update is not):
    # they check that the gradient is normalised by both ranks' tokens
    def steps(run):
        rows = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r) for r in rows if '"train"' in r]

    ddp, one = steps(tmp_path / "ddp"), steps(tmp_path / "one")
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
    for name, weight in single.model.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name
        # key biases get no gradient in exact arithmetic (softmax ignores a shift
        # shared by all keys): Adam turns their rounding noise into +-lr steps
        torch.testing.assert_close(rank0[name], weight, atol=2e-4, rtol=1e-4)
    assert not torch.equal(
        rank0["tgt_embed.weight"],
        Trainer(
            load_config(TOY, [f"training.run_dir={tmp_path / 'fresh'}", *common])
        ).model.tgt_embed.weight,
    )


@pytest.mark.slow
def test_progress_piped_to_a_file_is_a_few_log_lines(tmp_path, toy_tokenizer):
    # not a terminal: no redrawn bar, one line every training.log_seconds
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    with open(log, "wb") as stderr:
        result = subprocess.run(
            train_command(
                run,
                toy_tokenizer,
                "training.max_steps=500",
                "training.validate_every=250",
                "training.log_seconds=2",
            ),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=300,
        )
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    lines = text.splitlines()
    assert "\r" not in text
    progress = [line for line in lines if "/500 (" in line and "ETA" in line]
    assert 1 <= len(progress) <= 40 and len(lines) <= 80, len(lines)
    assert load_checkpoint(run / "last.pt")["step"] == 500
