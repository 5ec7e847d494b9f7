"""Time to quality (``python scripts/benchmark.py quality``): minutes of training
until the reference de->en config first reaches a validation BLEU (greedy).

One ``transformer-train`` run in a subprocess, the config's recipe plus the given
overrides, stopped by ``training.max_minutes``; the validation rows of its
``metrics.jsonl`` give the curve and the first crossing, both as minutes of updates
(``train_seconds``: what the recipe and the kernels decide) and as wall minutes
from the first update (validations included: what the user waits).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench_common import machine

ROOT = Path(__file__).resolve().parents[1]


def crossing(rows: list[dict], target: float) -> dict | None:
    """The first validation row at or above ``target`` BLEU, with its minutes."""
    start = next(r["time"] - r["train_seconds"] for r in rows if r["type"] == "train")
    for row in rows:
        if row["type"] == "valid" and row["bleu"] >= target:
            return {
                "step": row["step"],
                "bleu": row["bleu"],
                "update_minutes": row["train_seconds"] / 60,
                "wall_minutes": (row["time"] - start) / 60,
            }
    return None


def bench_quality(args) -> dict:
    run_dir = Path(args.out)
    overrides = [
        f"data.dir={args.data_dir}",
        f"training.run_dir={run_dir}",
        f"training.max_minutes={args.minutes}",
        f"training.validate_every={args.validate_every}",
        "training.save_every=0",
        "training.resume=never",
        "training.overwrite=true",
        *args.overrides,
    ]
    if args.threads:
        overrides.append(f"training.threads={args.threads}")
    config = ROOT / "configs" / args.config
    cmd = ["transformer-train", "--config", str(config), *overrides]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    curve = [
        {
            "step": r["step"],
            "bleu": r["bleu"],
            "update_minutes": r["train_seconds"] / 60,
        }
        for r in rows
        if r["type"] == "valid"
    ]
    speeds = sorted(
        r["tokens_per_s"] for r in rows if r["type"] == "train" and r["step"] > 1
    )
    return {
        "benchmark": "quality",
        "config": f"configs/{args.config}",
        "overrides": args.overrides,
        "target_bleu": args.target,
        "metric": "validation BLEU, greedy, sacreBLEU default (cased)",
        "reached": crossing(rows, args.target),
        "curve": curve,
        "target_tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None,
        "machine": machine(),
    }


def with_other_targets(path: Path, result: dict) -> dict:
    """The file's rows for other target BLEUs kept beside ``result``: a recipe for
    BLEU 40 does not erase the one for 27. A row is a whole run's record (its
    command, recipe, curve and machine); a file from before rows is one row."""
    rows = []
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        rows = old.get("rows", [old])
    rows = [r for r in rows if r["target_bleu"] != result["target_bleu"]]
    rows = sorted([*rows, result], key=lambda r: r["target_bleu"])
    return {"benchmark": "quality", "rows": rows}


def add_parser(sub) -> None:
    quality = sub.add_parser("quality", help="minutes to a validation BLEU")
    quality.add_argument("--config", default="multi30k_de_en.yaml")
    quality.add_argument("--target", type=float, default=27.0, help="validation BLEU")
    quality.add_argument("--minutes", type=float, default=17.0, help="update budget")
    quality.add_argument("--validate-every", type=int, default=100)
    quality.add_argument("--out", default=str(ROOT / "checkpoints" / "quality"))
    quality.add_argument(
        "--data-dir", default=str(ROOT.parent / "shared" / "data" / "multi30k")
    )
    quality.add_argument("--threads", type=int, default=0)
    quality.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")


if __name__ == "__main__":
    sys.exit("run it through scripts/benchmark.py quality")
