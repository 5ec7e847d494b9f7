"""Speed benchmarks: training throughput and decoding speed, written as JSON.

Training (the reference small model of ../shared/bench/joeynmt_peer.sh: d_model 256,
3+3 layers, 4 heads, d_ff 1024, pre-norm, 8k joint SentencePiece, 4,096-token
batches, Multi30k de->en), reported like the peer script: the median target tokens
per second over windows of 25 updates, the first window skipped:

    python scripts/benchmark.py train --peer --precision fp32 bf16

With --peer it first runs ../shared/bench/joeynmt_peer.sh with the same number of
updates, so that the ratio against JoeyNMT 2.3.0 is measured in one sitting. Each
precision (and, with --compile off on, each compile setting) runs in its own
process, so that each peak RSS is its own. Each run also reports the model FLOPs per
target token (counted once with FlopCounterMode on the forward and backward pass of
a real batch), the achieved model GFLOP/s, and its fraction of a 1024-wide matrix
product in the same dtype timed right after it in the same process (and, with
--peak-tflops, of that peak: the MFU).

The corpus store at 1x / 10x / 100x Multi30k (preprocessing, bytes per token, time
to the first update, peak RSS) and numpy files against Arrow (scripts/bench_data.py):

    python scripts/benchmark.py data

Decoding of Multi30k test_2016_flickr with a trained checkpoint: sentences per
second for greedy with and without the KV cache and for beam 5, in one run:

    python scripts/benchmark.py decode --checkpoint checkpoints/multi30k_de_en/best.pt

With --precision fp32 bf16 the same run also times the model cast to bf16
(decoding.precision: bf16; float32 where the CPU has no native bf16, see each row's
"weights") and reports its speed-up. Each precision runs in a process of its
own, as a user decodes (peak RSS is that process's). --max-tokens 8192 16384 times
the cached searches at each batch budget. With --compile it also
times the cached searches with decoding.compile: a first run, which compiles, and
a second one.

When ctranslate2 is installed (pip install -e ".[export]"; --no-ctranslate2 skips
it), the checkpoint is also exported to CTranslate2 with float32 and int8 weights and
each export decodes the same sources greedily and with beam 5 (alpha 1.0), on the
same number of threads, through transformer.export.ExportedModel (our search
settings: one translate_batch call per length limit, in this process) and, as a
user runs it, in a fresh process with one translate_batch call and CTranslate2's own
length limit and penalty (scripts/bench_ct2.py; rows ct2_process_*).

The architectures (Transformer, RNN with soft / hard / no attention, decoder-only)
trained for the same minutes each, then BLEU, speeds and BLEU by source length
(scripts/bench_compare.py):

    python scripts/benchmark.py compare --minutes 12 --lanes 2

Time to quality: minutes of training until the reference de->en config first
reaches a validation BLEU (greedy), with recipe overrides (scripts/bench_quality.py):

    python scripts/benchmark.py quality --target 27 --minutes 15 \
        data.max_tokens=2048 training.lr=0.001 training.warmup_steps=300

Decoding under control: terminology constraints (share met, BLEU, time against
plain beam search), target prefixes and scoring, with the published models on
test_2016_flickr (scripts/bench_control.py):

    python scripts/benchmark.py control --sentences 300

A distilled student against its teacher ensemble: the ensemble's beam search and
the student's greedy and beam search (float32, bf16, int8, CTranslate2 int8) on
the same sentences and threads, with BLEU and sizes (scripts/bench_student.py):

    python scripts/benchmark.py student --teachers A.safetensors B.safetensors \
        --student models/multi30k_de_en_student.safetensors

Serving throughput and latency under concurrent clients (scripts/bench_serve.py):

    python scripts/benchmark.py serve --clients 32 --seconds 30 --max-wait-ms 5 20
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_compare  # noqa: E402  (scripts/bench_compare.py)
import bench_control  # noqa: E402  (scripts/bench_control.py)
import bench_data  # noqa: E402  (scripts/bench_data.py)
import bench_quality  # noqa: E402  (scripts/bench_quality.py)
import bench_serve  # noqa: E402  (scripts/bench_serve.py)
import bench_student  # noqa: E402  (scripts/bench_student.py)
from bench_decode import bench_decode  # noqa: E402  (scripts/bench_decode.py)
from bench_train import bench_train, bench_train_all  # noqa: E402

from transformer.config import ConfigError  # noqa: E402

# options that count or time something: 0 makes no sense for these
_POSITIVE = {
    "updates", "max_tokens", "matmul_seconds", "minutes", "lanes", "clients",
    "rounds", "max_requests", "output_pieces", "validate_every", "format_batches",
    "sizes", "seconds", "beam", "chunk", "teacher_beam", "student_beam", "repeats",
}  # fmt: skip


def _check_numbers(args: argparse.Namespace) -> None:
    """Every number option is finite and not negative; counts and times above 0."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            low = 0 if name not in _POSITIVE else 1e-9
            if not (math.isfinite(v) and v >= low):
                need = "> 0" if name in _POSITIVE else ">= 0"
                raise ConfigError(
                    f"--{name.replace('_', '-')}: must be {need} (got {v})"
                )
    if getattr(args, "device", "auto") != "auto":
        from transformer.inference import resolve_device

        resolve_device(args.device, "--device")


def main(argv: list[str] | None = None) -> int:
    from transformer.cli.common import run_cli

    return run_cli(_main, argv, (subprocess.CalledProcessError,))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="training throughput")
    train.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/multi30k"))
    train.add_argument("--updates", type=int, default=100)
    train.add_argument("--max-tokens", type=int, default=4096)
    train.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"]
    )
    train.add_argument("--peer", action="store_true", help="run JoeyNMT's first")
    train.add_argument(
        "--compile",
        nargs="+",
        default=["off"],
        choices=["off", "on"],
        help="training.compile settings to run (off on: both, as separate rows)",
    )
    train.add_argument(
        "--sampling-alpha",
        nargs="+",
        type=float,
        default=[0.0],
        help="data.tokenizer.sampling_alpha values to run, each a row (0: off; "
        "0 0.1: subword sampling off and on, in one sitting)",
    )
    train.add_argument(
        "--matmul-seconds",
        type=float,
        default=2.0,
        help="how long the reference 1024-wide matrix product is timed",
    )
    train.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's dense peak in the run's dtype, for the MFU (0: none)",
    )
    train.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    train.add_argument("--run-dir", help="where the tokenizer and cache go")
    train.add_argument("overrides", nargs="*", help="extra config overrides")
    decode = sub.add_parser("decode", help="decoding speed")
    decode.add_argument("--checkpoint", required=True)
    decode.add_argument("--data-dir", help="override the checkpoint's data.dir")
    decode.add_argument("--split", default="test_2016_flickr")
    decode.add_argument("--limit", type=int, default=0, help="first N sentences only")
    decode.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8"]
    )
    decode.add_argument(
        "--no-ctranslate2", action="store_true", help="skip the CTranslate2 rows"
    )
    decode.add_argument(
        "--compile", action="store_true", help="also time decoding.compile (fp32)"
    )
    decode.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    decode.add_argument(
        "--max-tokens",
        type=int,
        nargs="+",
        default=[8192],
        help="source tokens per batch (divided by the beam size for beam search); "
        "the first is the main rows', each other times the cached rows and "
        "CTranslate2's int8 process rows again (keys ...@N), and the best "
        "speed-up over CTranslate2 takes each engine's fastest",
    )
    decode.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each cached row (ours and CTranslate2's); the median "
        "counts",
    )
    for p in (train, decode):
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=0)
    bench_data.add_parser(sub)
    bench_serve.add_parser(sub)
    bench_compare.add_parser(sub)
    bench_quality.add_parser(sub)
    bench_control.add_parser(sub)
    bench_student.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--output", help="JSON file (default: benchmarks/<what>.json)")
    args = parser.parse_args(argv)
    _check_numbers(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.what == "data":
        result = bench_data.bench_data(args)
    elif args.what == "decode":
        result = bench_decode(args)
    elif args.what == "serve":
        result = bench_serve.bench_serve(args)
    elif args.what == "compare":
        result = bench_compare.bench_compare(args)
    elif args.what == "quality":
        result = bench_quality.bench_quality(args)
    elif args.what == "control":
        result = bench_control.bench_control(args)
    elif args.what == "student":
        result = bench_student.bench_student(args)
    elif args.single:
        from transformer.allocator import without_thread_cache

        without_thread_cache()  # as transformer-train runs (the child's own run)
        args.precision, args.compile = args.precision[0], args.compile[0]
        result = bench_train(args)
    else:
        result = bench_train_all(args)
    result["command"] = " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    output = Path(args.output or ROOT / "benchmarks" / f"{args.what}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    saved = result
    if args.what == "quality":  # one row per target BLEU, each with its command
        saved = bench_quality.with_other_targets(output, result)
    output.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {k: v for k, v in result.items() if not isinstance(v, list)}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
