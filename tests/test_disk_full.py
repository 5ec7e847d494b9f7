"""Checkpoints that fit the disk: one file's space a save (hard links), a check of
the free space before writing, early pruning under keep_last, a clean stop with
last.pt intact, and one line instead of torch's traceback when a write fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL, TOY, tiny
from transformer.checkpoint import atomic_save, load_checkpoint
from transformer.cli.train import train_main
from transformer.training import Trainer, TrainingError


def cli_args(run: Path, tokenizer: str, cache: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(TOY),
        f"training.run_dir={run}",
        f"data.tokenizer.model={tokenizer}",
        f"data.cache_dir={cache}",
        *SMALL,
        *extra,
    ]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_during_a_save_stops_the_run_with_last_pt_intact(
    tmp_path, toy_tokenizer, small_fs, capsys
):
    """The issue's case: a checkpoint that did not fit ended the run with three
    chained tracebacks, after a step_<N>.pt that was newer than last.pt."""
    run = small_fs("1536k") / "run"  # one checkpoint (~0.9 MB), not two
    args = cli_args(
        run,
        toy_tokenizer,
        tmp_path / "cache",
        "training.max_steps=8",
        "training.save_every=2",
        "training.keep_last=5",
    )
    assert train_main(args) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith(f"error: {run}: no room for a checkpoint: about ")
    assert " bytes needed, " in line and " free; the run stops: " in line
    assert line.endswith(f"{run / 'last.pt'} (step 2)")
    assert "Traceback" not in err and "inline_container" not in err
    assert load_checkpoint(run / "last.pt")["step"] == 2  # whole, resumable
    assert (run / "last.pt").stat().st_ino == (run / "step_2.pt").stat().st_ino
    assert sorted(p.name for p in run.glob("*.pt")) == ["last.pt", "step_2.pt"]
    assert leftovers(run) == []


def test_old_step_checkpoints_are_pruned_early_to_keep_training(
    tmp_path, toy_tokenizer, small_fs, caplog
):
    run = small_fs("2560k") / "run"  # two checkpoints, not three
    cfg = tiny(
        run,
        toy_tokenizer,
        f"data.cache_dir={tmp_path / 'cache'}",
        "training.max_steps=6",
        "training.save_every=1",
        "training.keep_last=2",
    )
    Trainer(cfg).train()
    assert "a checkpoint needs about" in caplog.text
    assert (
        "dropped step_" in caplog.text and "early (training.keep_last=2)" in caplog.text
    )
    assert load_checkpoint(run / "last.pt")["step"] == 6
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_5.pt", "step_6.pt"]
    assert leftovers(run) == []


def test_a_save_is_one_file_linked_under_each_name(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    cfg = tiny(
        run,
        toy_tokenizer,
        "training.max_steps=4",
        "training.validate_every=2",
        "training.keep_last=5",
    )
    trainer = Trainer(cfg)
    trainer.train()
    last = (run / "last.pt").stat()
    assert last.st_nlink == 3  # last.pt, step_4.pt and best.pt, or 2 if not best
    assert (run / "step_4.pt").stat().st_ino == last.st_ino
    assert (run / "best.pt").stat().st_ino == last.st_ino
    # replacing last.pt never changed the bytes behind step_2.pt's name
    assert load_checkpoint(run / "step_2.pt")["step"] == 2
    assert (run / "step_2.pt").stat().st_nlink == 1


def test_without_hard_links_the_names_are_copies(tmp_path, toy_tokenizer, monkeypatch):
    from transformer import files

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_links)
    run = tmp_path / "run"
    Trainer(
        tiny(run, toy_tokenizer, "training.max_steps=2", "training.validate_every=2")
    ).train()
    data = (run / "last.pt").read_bytes()
    for name in ("best.pt", "step_2.pt"):
        assert (run / name).read_bytes() == data
        assert (run / name).stat().st_ino != (run / "last.pt").stat().st_ino
    assert leftovers(run) == []


class FailingFile:
    """A file whose writes fail with ``code`` once ``limit`` bytes are written."""

    def __init__(self, f, code: int, limit: int) -> None:
        self.f, self.code, self.left = f, code, limit

    def write(self, data) -> int:
        self.left -= len(data)
        if self.left < 0:
            raise OSError(self.code, os.strerror(self.code))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EIO])
def test_a_write_failing_midway_is_one_error_and_leaves_no_file(
    tmp_path, monkeypatch, code
):
    from transformer import files

    real = files.os.fdopen
    monkeypatch.setattr(
        files.os, "fdopen", lambda fd, mode: FailingFile(real(fd, mode), code, 5000)
    )
    target = tmp_path / "x.pt"
    target.write_bytes(b"the old file")
    with pytest.raises(OSError) as e:
        atomic_save({"w": torch.zeros(10_000)}, target)
    assert (e.value.errno, e.value.filename) == (code, str(target))
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert target.read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_a_failed_checkpoint_write_ends_the_run_in_one_line(
    tmp_path, toy_tokenizer, monkeypatch
):
    from transformer import files

    run = tmp_path / "run"
    trainer = Trainer(
        tiny(run, toy_tokenizer, "training.max_steps=6", "training.save_every=2")
    )
    real = files.os.fdopen
    writes = []

    def fdopen(fd, mode):
        writes.append(fd)
        limit = 10**12 if len(writes) == 1 else 5000  # the second save fails
        return FailingFile(real(fd, mode), errno.ENOSPC, limit)

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    with pytest.raises(TrainingError) as e:
        trainer.train()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        f"cannot write {run / 'last.pt'}: No space left on device"
    )
    assert message.endswith(f"{run / 'last.pt'} (step 2)")
    assert load_checkpoint(run / "last.pt")["step"] == 2
    assert leftovers(run) == []


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(
    tmp_path, toy_tokenizer, caplog
):
    run = tmp_path / "run"
    run.mkdir()
    cut = run / ".last.pt.x7q2.tmp"  # what a SIGKILL mid-save leaves
    cut.write_bytes(b"\0" * 1000)
    (run / "notes.tmp").write_text("not ours")
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=1"))
    assert not cut.exists() and (run / "notes.tmp").exists()
    assert f"removed {cut}, left by a write that was cut short" in caplog.text
