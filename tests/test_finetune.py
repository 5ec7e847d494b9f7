"""Fine-tuning (``training.init_from``): a new run from another checkpoint's
weights and tokenizer."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import SMALL, TOY, tiny
from transformer.checkpoint import CheckpointError, load_checkpoint
from transformer.cli.train import train_main
from transformer.tokenizer import Tokenizer
from transformer.training import Trainer
from transformer.training.validation import evaluate_loss

ACCURACY = ["training.best_metric=accuracy", "training.validate_every=1000"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, toy_tokenizer):
    """A toy copy-task model (with an EMA of its weights)."""
    run = tmp_path_factory.mktemp("parent") / "copy"
    cfg = tiny(run, toy_tokenizer, "training.max_steps=100", "training.ema_decay=0.9")
    Trainer(cfg).train()
    return run / "last.pt"


def reverse_run(run, tokenizer, *extra):
    return tiny(
        run,
        tokenizer,
        "data.format=reverse",
        "training.max_steps=40",
        *ACCURACY,
        *extra,
    )


def accuracy(trainer: Trainer) -> float:
    cpu = torch.device("cpu")
    (valid,) = trainer.valid  # one direction: one validation set
    return evaluate_loss(trainer.model, valid.corpus, 256, cpu, "fp32")["accuracy"]


@pytest.mark.slow
def test_fine_tuning_beats_training_from_scratch(parent, tmp_path, toy_tokenizer):
    scratch = Trainer(reverse_run(tmp_path / "scratch", toy_tokenizer))
    tuned = Trainer(
        reverse_run(tmp_path / "tuned", toy_tokenizer, f"training.init_from={parent}")
    )
    # a new run: the parent's weights, a fresh optimizer, schedule and position
    saved = load_checkpoint(parent)
    for name, value in tuned.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    assert not tuned.optimizer.state and tuned.scheduler.last_epoch == 0
    assert (tuned.step, tuned.state.epoch, tuned.state.batch_in_epoch) == (0, 0, 0)
    assert (
        tuned.tokenizer.hash() == Tokenizer.from_state_dict(saved["tokenizer"]).hash()
    )
    scratch.train()
    tuned.train()
    assert load_checkpoint(tmp_path / "tuned" / "last.pt")["step"] == 40
    assert accuracy(tuned) > accuracy(scratch) + 0.05


def test_fine_tuning_from_the_ema_weights(parent, tmp_path, toy_tokenizer):
    cfg = reverse_run(
        tmp_path / "run",
        toy_tokenizer,
        f"training.init_from={parent}",
        "training.init_weights=ema",
    )
    trainer = Trainer(cfg)
    ema = load_checkpoint(parent)["ema"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, ema[name]), name


def test_the_tokenizer_comes_from_the_checkpoint(parent, tmp_path, caplog):
    # data.tokenizer names a model file that does not exist: it is not read
    cfg = reverse_run(
        tmp_path / "run", str(tmp_path / "none.model"), f"training.init_from={parent}"
    )
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg)
    assert "uses the tokenizer of training.init_from" in caplog.text
    saved = Tokenizer.from_state_dict(load_checkpoint(parent)["tokenizer"])
    assert trainer.tokenizer.hash() == saved.hash()


def test_another_architecture_is_refused(parent, tmp_path, toy_tokenizer):
    init = f"training.init_from={parent}"
    with pytest.raises(
        CheckpointError, match=r"model\.d_ff: checkpoint 64, config 128"
    ):
        Trainer(reverse_run(tmp_path / "a", toy_tokenizer, init, "model.d_ff=128"))
    # dropout is no part of the architecture; another architecture is
    Trainer(reverse_run(tmp_path / "b", toy_tokenizer, init, "model.dropout=0.3"))
    with pytest.raises(CheckpointError, match=r"model\.arch: checkpoint 'transf"):
        Trainer(reverse_run(tmp_path / "c", toy_tokenizer, init, "model.arch=rnn"))
    # refused before training.overwrite deletes anything of the run it would replace
    old = tmp_path / "old"
    Trainer(reverse_run(old, toy_tokenizer, "training.max_steps=1")).train()
    before = sorted(p.name for p in old.iterdir())
    wrong = reverse_run(
        old,
        toy_tokenizer,
        init,
        "model.d_ff=128",
        "training.overwrite=true",
        "training.resume=never",
    )
    with pytest.raises(CheckpointError, match=r"model\.d_ff"):
        Trainer(wrong)
    assert sorted(p.name for p in old.iterdir()) == before
    assert load_checkpoint(old / "last.pt")["step"] == 1


def test_missing_checkpoint_is_a_clear_error(tmp_path, toy_tokenizer, capsys):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match="training.init_from: .*not found"):
        Trainer(
            reverse_run(tmp_path / "a", toy_tokenizer, f"training.init_from={missing}")
        )
    args = ["--config", str(TOY), f"training.run_dir={tmp_path / 'b'}", *SMALL]
    assert train_main([*args, f"training.init_from={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"training.init_from: {missing}: checkpoint not found" in err
    assert "Traceback" not in err


def test_ema_of_a_checkpoint_without_one(parent, tmp_path, toy_tokenizer):
    plain = tmp_path / "plain"
    Trainer(tiny(plain, toy_tokenizer, "training.max_steps=1")).train()
    cfg = reverse_run(
        tmp_path / "run",
        toy_tokenizer,
        f"training.init_from={plain / 'last.pt'}",
        "training.init_weights=ema",
    )
    with pytest.raises(CheckpointError, match=f"{plain / 'last.pt'}: holds no EMA"):
        Trainer(cfg)


def test_an_existing_run_resumes_instead(parent, tmp_path, toy_tokenizer, caplog):
    run = tmp_path / "run"
    init = f"training.init_from={parent}"
    Trainer(reverse_run(run, toy_tokenizer, init, "training.max_steps=3")).train()
    with caplog.at_level(logging.INFO):
        resumed = Trainer(reverse_run(run, toy_tokenizer, init))
    assert resumed.step == 3
    assert "training.init_from is not used" in caplog.text
    # resumed, not restarted from the parent: the weights are the run's own
    own = load_checkpoint(run / "last.pt")["model"]
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, own[name]), name
