"""The one-shot GPU check: on a machine with an NVIDIA GPU, within about ten minutes,
every figure of the GPU run in one JSON file (``scripts/gpu_check.sh`` calls this).

1. the CUDA tests (``pytest -m cuda``): passed / failed / skipped;
2. training throughput of the paper's base model (``configs/transformer_base.yaml``'s
   architecture: d 512, 6 + 6 layers, 8 heads, d_ff 2048, post-norm) on Multi30k
   de->en in bf16, with ``training.compile`` off and on: target tokens/s, model
   FLOPs counted with FlopCounterMode, MFU against ``--peak-tflops`` (989: an
   H100/H200's dense bf16), peak ``torch.cuda.max_memory_allocated``;
3. the reference de->en config trained ``--updates`` (1,500) updates in fp32 and in
   bf16 from one seed, with their validation BLEU (greedy);
4. greedy and beam-5 decoding of test_2016_flickr with the fp32 run's checkpoint:
   sentences/s, with and without ``decoding.compile``.

A part that fails is recorded with its error and the next one runs; nothing is
estimated: a figure the run did not produce stays absent, with the reason.

    bash scripts/gpu_check.sh --out benchmarks/gpu.json
    bash scripts/gpu_check.sh --dry-run --out /tmp/gpu.json   # CPU, tiny, seconds

``--dry-run`` runs every part on the CPU with tiny sizes (a few updates of a small
model, a few sentences), so that CI checks that the script still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = [  # configs/transformer_base.yaml's architecture on Multi30k
    "model.d_model=512",
    "model.n_heads=8",
    "model.encoder_layers=6",
    "model.decoder_layers=6",
    "model.d_ff=2048",
    "model.norm_first=false",
    "model.dropout=0.1",
]
TINY = [  # --dry-run: the same code paths, seconds on a CPU
    "model.d_model=32",
    "model.n_heads=2",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.d_ff=64",
]


# --dry-run's quality runs: tiny, a small tokenizer, loss only
DRY_QUALITY = [
    *TINY,
    "data.max_tokens=512",
    "data.valid_max_tokens=2048",
    "data.tokenizer.vocab_size=500",
    "data.tokenizer.sample_sentences=2000",
    "training.valid_bleu=false",
    "training.best_metric=loss",
]


def run(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``command`` from the repository root; its status, time and output tail."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        status, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status, out = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
    return {
        "command": " ".join(command),
        "status": status,
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": str(out)[-3000:],
    }


def cuda_tests(args) -> dict:
    result = run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
        args.timeout,
    )
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", result["output_tail"])
    result["counts"] = {kind: int(n) for n, kind in summary}
    return result


def train_throughput(args, tmp: Path) -> dict:
    rows = {}
    model = TINY if args.dry_run else BASE
    for compile_ in ("off",) if args.dry_run else ("off", "on"):  # compiling: minutes
        out = tmp / f"train_{compile_}.json"
        command = [
            sys.executable, "scripts/benchmark.py", "train",
            "--precision", "fp32" if args.dry_run else "bf16",
            "--compile", compile_,
            "--updates", str(3 if args.dry_run else args.throughput_updates),
            "--max-tokens", str(256 if args.dry_run else 8192),
            "--peak-tflops", str(args.peak_tflops),
            "--matmul-seconds", "0.2" if args.dry_run else "3",
            "--device", args.device,
            "--run-dir", str(tmp / "bench-run"),
            "--output", str(out),
            *model,
        ]  # fmt: skip
        result = run(command, args.timeout)
        if out.exists():
            data = json.loads(out.read_text())
            runs = list(data.get("runs", {}).values())
            result["figures"] = [
                {
                    k: r.get(k)
                    for k in (
                        "precision_effective",
                        "compile",
                        "target_tokens_per_s_median",
                        "model_gflops_per_s",
                        "mfu",
                        "cuda_max_allocated_mib",
                        "model_flops_per_target_token",
                    )
                }
                for r in runs
                if isinstance(r, dict)
            ]
        rows[f"compile_{compile_}"] = result
    return rows


def quality(args, tmp: Path) -> dict:
    """The reference de->en config, fp32 and bf16 from one seed: validation BLEU."""
    rows = {}
    updates = 4 if args.dry_run else args.updates
    for precision in ("fp32", "bf16"):
        run_dir = tmp / f"quality_{precision}"
        command = [
            sys.executable, "scripts/train.py",
            "--config", "configs/multi30k_de_en.yaml",
            f"training.run_dir={run_dir}",
            f"training.precision={precision}",
            f"training.device={args.device}",
            f"training.max_steps={updates}",
            f"training.validate_every={updates}",
            "training.save_every=0",
            "training.tensorboard=false",
            "training.resume=never",
            *(DRY_QUALITY if args.dry_run else []),
        ]  # fmt: skip
        if precision == "bf16" and (tmp / "quality_fp32" / "spm.model").exists():
            # the same tokenizer for both: only the precision differs
            command.append(f"data.tokenizer.model={tmp / 'quality_fp32' / 'spm.model'}")
        result = run(command, args.timeout)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            valid = [
                json.loads(line)
                for line in metrics.read_text().splitlines()
                if '"valid"' in line
            ]
            if valid:
                last = valid[-1]
                result["valid"] = {
                    k: last.get(k) for k in ("step", "bleu", "loss", "train_seconds")
                }
        result["checkpoint"] = str(run_dir / "best.pt")
        rows[precision] = result
    return rows


DECODE_FIGURES = ("sentences_per_s", "bleu", "first_run_seconds")


def decoding(args, tmp: Path, checkpoint: str) -> dict:
    out = tmp / "decode.json"
    command = [
        sys.executable, "scripts/benchmark.py", "decode",
        "--checkpoint", checkpoint,
        "--precision", "fp32", "bf16",
        "--no-ctranslate2",
        *([] if args.dry_run else ["--compile"]),
        "--device", args.device,
        "--output", str(out),
    ]  # fmt: skip
    if args.dry_run:
        command += ["--limit", "8"]
    result = run(command, args.timeout)
    if out.exists():
        data = json.loads(out.read_text())
        result["runs"] = {
            name: {
                k: r.get(k) for k in ("sentences_per_s", "bleu", "first_run_seconds")
            }
            for name, r in data.get("runs", {}).items()
        }
    return result


def environment(args) -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "peak_tflops_dense_bf16": args.peak_tflops,
        "dry_run": args.dry_run,
    }
    if torch.cuda.is_available():
        info["gpu_memory_gib"] = (
            torch.cuda.get_device_properties(0).total_memory / 2**30
        )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    parser.add_argument("--updates", type=int, default=1500, help="quality runs")
    parser.add_argument("--throughput-updates", type=int, default=60)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--timeout", type=float, default=420, help="seconds a part")
    args = parser.parse_args(argv)
    import torch

    args.device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    report = {"environment": environment(args), "parts": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        tmp = Path(folder)
        parts = report["parts"]
        parts["cuda_tests"] = cuda_tests(args)
        parts["train_base_bf16"] = train_throughput(args, tmp)
        parts["quality_de_en"] = quality(args, tmp)
        checkpoint = parts["quality_de_en"]["fp32"]["checkpoint"]
        if Path(checkpoint).exists():
            parts["decode_test"] = decoding(args, tmp, checkpoint)
        else:
            parts["decode_test"] = {"status": "not run: the fp32 run wrote no model"}
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failed = [
        name
        for name, part in report["parts"].items()
        for p in (part.values() if "status" not in part else [part])
        if isinstance(p, dict) and p.get("status") not in (0, None)
    ]
    print(
        f"wrote {out} in {report['seconds']} s; parts that failed: {failed or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
