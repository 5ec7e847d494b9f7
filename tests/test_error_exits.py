"""Every error path ends every process of the job: a non-zero status, one clear
error, no process left behind, no hang at exit. The issue's case: a data worker
that raised left its main process waiting forever in multiprocessing's exit
handler for a worker that ignored the one SIGTERM it sends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL, TOY, needs_torchrun

FAULT_TRAIN = ROOT / "tests" / "fault_train.py"


def marked(marker: str) -> list[int]:
    """The live processes whose environment holds ``FAULT_RUN=marker`` (every
    process of the job inherits it: ranks and their data workers)."""
    needle = f"FAULT_RUN={marker}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                stat = (environ.parent / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # not a zombie
                    found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def run_job(args: list[str], env: dict, timeout: float) -> tuple[int, str, list[int]]:
    """Run a job; returns (status, stderr, processes still alive soon after). A
    job that does not end within ``timeout`` fails the test (and is killed)."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_RUN": marker, **env}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s: it hangs")
    deadline = time.time() + 15  # orphans get a few seconds to notice
    while marked(marker) and time.time() < deadline:
        time.sleep(0.2)
    left = marked(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return proc.returncode, err.decode(), left


def job_args(run: Path, tokenizer: str, workers: int, *extra: str) -> list[str]:
    return [
        "--config",
        str(TOY),
        f"training.run_dir={run}",
        f"data.tokenizer.model={tokenizer}",
        f"data.cache_dir={run.parent / 'cache'}",
        *SMALL,
        "training.device=cpu",
        "training.max_steps=1000",
        f"data.workers={workers}",
        *extra,
    ]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


SAVE = "error: cannot write {run}/last.pt: No space left on device"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_data_worker_error_ends_the_run(tmp_path, toy_tokenizer, workers):
    run = tmp_path / "run"
    args = [sys.executable, str(FAULT_TRAIN), *job_args(run, toy_tokenizer, workers)]
    status, err, left = run_job(args, {"FAULT": "worker:0:3"}, timeout=120)
    assert status == 1, err[-3000:]
    (line,) = error_lines(err)
    assert line.startswith("error: data worker 0 (epoch 0, batch ")
    assert "failed: IndexError: index 2246 is out of bounds" in line
    assert err.rstrip().endswith(line)  # the last word, after the logged trace
    assert err.count("Traceback") == 1  # the worker's own, logged once
    assert not left, f"processes left behind: {left}"
    assert (run / "last.pt").exists()  # the last step boundary, saved


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["validation", "save"])
def test_a_validation_or_save_error_with_data_workers_ends_the_run(
    tmp_path, toy_tokenizer, fault
):
    run = tmp_path / "run"
    extra = ("training.validate_every=3", "training.save_every=2")
    args = [
        sys.executable,
        str(FAULT_TRAIN),
        *job_args(run, toy_tokenizer, 2, *extra),
    ]
    status, err, left = run_job(args, {"FAULT": f"{fault}:0"}, timeout=120)
    assert status == 1, err[-3000:]
    if fault == "validation":  # a bug: its traceback, ending with its message
        assert err.rstrip().endswith("RuntimeError: injected validation fault")
    else:
        (line,) = error_lines(err)
        assert line.startswith(SAVE.format(run=run)), line
        assert "Traceback" not in err
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize(
    "fault, workers",
    [("worker:1:3", 1), ("worker:1:3", 2), ("validation:0", 2), ("save:0", 2)],
)
def test_an_error_on_one_rank_ends_every_rank(tmp_path, toy_tokenizer, fault, workers):
    run = tmp_path / "run"
    extra = ("training.validate_every=3", "training.save_every=2")
    args = [
        "torchrun",
        "--standalone",
        "--nproc-per-node=2",
        str(FAULT_TRAIN),
        *job_args(run, toy_tokenizer, workers, *extra),
    ]
    status, err, left = run_job(args, {"FAULT": fault}, timeout=240)
    assert status != 0
    assert not left, f"processes left behind: {left}"
    lines = error_lines(err)
    if fault.startswith("worker"):
        # rank 0 then says it lost rank 1, unless torchrun ended it first
        assert lines[0].startswith("error: rank 1's data worker "), err[-4000:]
        assert "failed: IndexError: index 2246" in lines[0]
        assert all("lost the other ranks" in line for line in lines[1:]), lines
    elif fault.startswith("validation"):  # rank 0 shows the bug's traceback
        assert "RuntimeError: injected validation fault" in err
        assert lines == [
            "error: rank 0 failed while validating: RuntimeError: injected "
            "validation fault"
        ], err[-4000:]
    else:
        # rank 0's own line, or rank 1's naming rank 0's cause (torchrun may
        # end rank 0 before it prints, once rank 1 has exited): either way
        # every line names the full cause, and at least one line is there
        expected = SAVE.format(run=run)
        other = "error: rank 0 failed while writing a checkpoint: TrainingError: "
        assert lines, err[-4000:]
        assert all(
            line.startswith((expected, other + expected[7:])) for line in lines
        ), lines
