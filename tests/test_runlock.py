"""One run per folder: a second start into a live run's folder is refused at once
naming the owner; a dead owner's lock is taken over; forked children never keep
their parent's lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    SMALL,
    TOY,
    needs_torchrun,
    tiny,
    torchrun,
    train_command,
    wait_for_rows,
)
from transformer.cli.train import preprocess_main, train_main
from transformer.training import Trainer

LOCK_FILE = "run.lock"  # transformer.training.runlock.LOCK_FILE


def is_held(path: Path) -> bool:
    from transformer.locks import is_held  # new: imported here, so that the issue's

    return is_held(path)  # case below also runs (and fails) on code without it


# holds the lock file argv[1] until its standard input closes
HOLDER = (
    "import sys; from transformer.locks import acquire; l = acquire(sys.argv[1]); "
    "print('held', flush=True); sys.stdin.read()"
)


def hold(path: Path) -> subprocess.Popen:
    """Another process that holds the lock file ``path`` (close its stdin to end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline() == b"held\n"
    return proc


def cli_args(run: Path, tokenizer: str, *extra: str) -> list[str]:
    return [
        "--config",
        str(TOY),
        f"training.run_dir={run}",
        f"data.tokenizer.model={tokenizer}",
        f"data.cache_dir={run.parent / 'cache'}",
        *SMALL,
        "training.max_steps=2",
        *extra,
    ]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_locked_folder_is_refused_in_one_line_by_train_overwrite_and_preprocess(
    tmp_path, toy_tokenizer, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_text("another run's checkpoint")
    holder = hold(run / LOCK_FILE)
    try:
        for main, extra in (
            (train_main, ()),
            (train_main, ("--overwrite",)),
            (preprocess_main, ()),
        ):
            assert main(cli_args(run, toy_tokenizer, *extra)) == 2
            (line,) = error_lines(capsys.readouterr().err)
            assert line.startswith(f"error: training.run_dir: {run} is in use by")
            assert f"host {socket.gethostname()}, pid {holder.pid}, since " in line
            assert (run / "last.pt").read_text() == "another run's checkpoint"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert train_main(cli_args(run, toy_tokenizer, "--overwrite")) == 0
    assert not is_held(run / LOCK_FILE)  # released at the end of the run
    assert (run / LOCK_FILE).read_bytes() == b""  # released, not abandoned


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(
    tmp_path, toy_tokenizer, caplog
):
    run = tmp_path / "run"
    run.mkdir()
    dead = {"host": "node7", "pid": 4321, "since": "2026-01-02T03:04:05+00:00"}
    (run / LOCK_FILE).write_text(json.dumps(dead))  # a record, but no flock
    trainer = Trainer(tiny(run, toy_tokenizer, "training.max_steps=1"))
    assert is_held(run / LOCK_FILE)
    assert (
        "took over the lock left by a process that ended without releasing it "
        "(host node7, pid 4321, since 2026-01-02T03:04:05+00:00)" in caplog.text
    )
    record = json.loads((run / LOCK_FILE).read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    trainer.train()
    assert not is_held(run / LOCK_FILE)


def test_a_start_that_fails_releases_its_lock(tmp_path, toy_tokenizer, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_text("another run's")  # a fresh run there is refused
    assert train_main(cli_args(run, toy_tokenizer, "--no-resume")) == 1
    assert "holds a previous run's checkpoints" in capsys.readouterr().err
    assert not is_held(run / LOCK_FILE)
    assert (run / LOCK_FILE).read_bytes() == b""  # no dead owner for the next run


def test_a_run_that_fails_releases_its_lock(tmp_path, toy_tokenizer, monkeypatch):
    from transformer.training import TrainingError

    run = tmp_path / "run"
    trainer = Trainer(tiny(run, toy_tokenizer, "training.max_steps=3"))

    def fail(*args, **kwargs):
        raise TrainingError("injected")

    monkeypatch.setattr(trainer, "train_step", fail)
    with pytest.raises(TrainingError):
        trainer.train()
    assert not is_held(run / LOCK_FILE)


def _sleep_child(started, seconds: float) -> None:
    started.set()  # the fork hooks have run
    time.sleep(seconds)


@pytest.mark.slow
def test_the_lock_is_per_process_and_not_kept_by_forked_children(tmp_path):
    from transformer.locks import LockHeld, acquire

    path = tmp_path / "x.lock"
    first = acquire(path)
    second = acquire(path)  # the same process: shared, counted
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=_sleep_child, args=(started, 30), daemon=True)
    child.start()  # inherits the descriptor, and must close it
    assert started.wait(30)
    try:
        first.release()
        assert is_held(path)  # ``second`` still holds it
        second.release()
        assert not is_held(path), "a forked child kept its parent's lock"
        again = acquire(path)
        again.release()
    finally:
        child.kill()
        child.join()
    holder = hold(path)
    try:
        with pytest.raises(LockHeld) as e:
            acquire(path)
        assert e.value.owner is not None and e.value.owner.pid == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.slow
def test_two_trainings_into_one_folder(tmp_path, toy_tokenizer):
    """The issue's case: a second ``transformer-train`` while the first runs exits
    at once with status 2 and one line naming the owner; the first is untouched."""
    run = tmp_path / "run"
    args = train_command(run, toy_tokenizer, "training.max_steps=100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        wait_for_rows(run / "metrics.jsonl", 2)
        assert first.poll() is None, first.communicate()[1].decode()[-3000:]
        second = subprocess.run(
            args, capture_output=True, text=True, timeout=60, env=env
        )
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = error_lines(second.stderr)
        assert f"pid {first.pid}, since" in line and str(run) in line
        assert "Traceback" not in second.stderr
        assert not list(run.glob("metrics.*.jsonl"))  # nothing was set aside
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            _, err = first.communicate(timeout=120)
        finally:
            first.kill()
    assert first.returncode == 0, err.decode()[-3000:]
    assert not is_held(run / LOCK_FILE)


@pytest.mark.slow
@needs_torchrun
def test_under_torchrun_no_rank_starts_when_rank0_cannot_lock(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    holder = hold(run / LOCK_FILE)
    try:
        proc = torchrun(
            tmp_path,
            tmp_path / "out",
            run,
            f"data.tokenizer.model={toy_tokenizer}",
            "training.max_steps=2",
            wait=False,
        )
        try:
            _, err = proc.communicate(timeout=240)
        finally:
            proc.kill()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    err = err.decode()
    assert proc.returncode != 0
    assert "RunDirBusy: training.run_dir:" in err
    assert "rank 0 failed while locking the run folder" in err  # rank 1's error
    assert not (run / "last.pt").exists() and not (tmp_path / "out/rank1.pt").exists()
