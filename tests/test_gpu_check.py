"""``scripts/gpu_check.sh --dry-run``: the GPU check runs every part on the CPU with
tiny sizes, so that the script cannot rot before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_a_cpu(tmp_path):
    if not (MULTI30K / "train.de.gz").exists():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    out = tmp_path / "gpu.json"
    script = str(ROOT / "scripts" / "gpu_check.sh")
    run = subprocess.run(
        ["bash", script, "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["environment"]["dry_run"] is True
    assert parts["cuda_tests"]["status"] == 0  # skipped without a GPU, not failed
    assert parts["cuda_tests"]["counts"].get("skipped", 0) > 0
    (figures,) = parts["train_base_bf16"]["compile_off"]["figures"]
    assert figures["target_tokens_per_s_median"] > 0
    assert figures["model_flops_per_target_token"] > 0
    for precision in ("fp32", "bf16"):
        assert parts["quality_de_en"][precision]["valid"]["step"] == 4
    runs = parts["decode_test"]["runs"]
    assert runs["greedy_cached"]["sentences_per_s"] > 0
    assert "beam5_cached" in runs


@pytest.mark.slow
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == "error: no CUDA device (use --dry-run on a CPU)"
