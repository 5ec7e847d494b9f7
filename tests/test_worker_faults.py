"""An error in a data worker ends every process of the job: a non-zero status,
one error line, no process left behind, no hang at exit (the issue's case: a
worker that raised left its main process waiting forever in multiprocessing's
exit handler for a worker that ignored the one SIGTERM it sends)."""

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


def job_args(run: Path, tokenizer: str, workers: int) -> list[str]:
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
    ]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_data_worker_error_ends_the_run(tmp_path, toy_tokenizer, workers):
    args = [
        sys.executable,
        str(FAULT_TRAIN),
        *job_args(tmp_path / "run", toy_tokenizer, workers),
    ]
    status, err, left = run_job(args, {"FAULT_WORKER": "0:3"}, timeout=120)
    assert status == 1, err[-3000:]
    (line,) = error_lines(err)
    assert line.startswith("error: data worker ")
    assert "failed: IndexError: index 2246 is out of bounds" in line
    assert err.rstrip().endswith(line)  # the last word, after the logged trace
    assert err.count("Traceback") == 1  # the worker's own, logged once
    assert not left, f"processes left behind: {left}"
    assert (tmp_path / "run" / "last.pt").exists()  # the last boundary, saved


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("workers", [1, 2])
def test_a_data_worker_error_on_one_rank_ends_every_rank(
    tmp_path, toy_tokenizer, workers
):
    args = [
        "torchrun",
        "--standalone",
        "--nproc-per-node=2",
        str(FAULT_TRAIN),
        *job_args(tmp_path / "run", toy_tokenizer, workers),
    ]
    status, err, left = run_job(args, {"FAULT_WORKER": "1:3"}, timeout=240)
    assert status != 0
    lines = error_lines(err)
    assert lines and lines[0].startswith("error: rank 1's data worker "), err[-4000:]
    assert "failed: IndexError: index 2246" in lines[0]
    # rank 0 either says it lost rank 1, or torchrun ended it first
    assert all("lost the other ranks" in line for line in lines[1:]), lines
    assert not left, f"processes left behind: {left}"
