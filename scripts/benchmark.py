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
"weights") and reports its speed-up; peak RSS is the process peak so far, so a
bf16 run's figure includes the float32 runs before it. With --compile it also
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
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_compare  # noqa: E402  (scripts/bench_compare.py)
import bench_data  # noqa: E402  (scripts/bench_data.py)
import bench_quality  # noqa: E402  (scripts/bench_quality.py)
import bench_serve  # noqa: E402  (scripts/bench_serve.py)
from bench_common import machine, peak_rss_mib, sdpa_flop_mapping  # noqa: E402
from bench_train import bench_train, bench_train_all  # noqa: E402

from transformer.config import ConfigError, DecodingConfig  # noqa: E402


def decode_gflop(decode) -> float:
    """Model FLOPs of one call of ``decode()``: matrix products and attention, GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as count:
        decode()
    return count.get_total_flops() / 1e9


def ctranslate2_available(args) -> bool:
    if args.no_ctranslate2:
        return False
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        logging.info("ctranslate2 not installed: no CTranslate2 rows")
        return False
    return True


def bench_ctranslate2(
    model, tokenizer, sources, refs, runs, device, export_dir: Path
) -> dict:
    """Export with float32 and int8 weights; time greedy and beam 5 of each."""
    from transformer.evaluation import score_corpus
    from transformer.export import ExportedModel, export_model

    results = {}
    for quantization, suffix in ((None, ""), ("int8", "_int8")):
        path = export_dir / (quantization or "float32")
        export_model(model, tokenizer, path, quantization)
        exported = ExportedModel(
            path, device.type, intra_threads=torch.get_num_threads()
        )
        for name in ("greedy_cached", "beam5_cached"):
            dcfg = runs[name][0]
            exported.translate(sources[:16], dcfg)
            start = time.perf_counter()
            out = exported.translate(sources, dcfg)
            seconds = time.perf_counter() - start
            hyps = [h[0].text for h in out]
            key = f"ct2_{name.removesuffix('_cached')}{suffix}"
            results[key] = {
                "seconds": seconds,
                "sentences_per_s": len(sources) / seconds,
                "bleu": score_corpus(hyps, refs)["bleu"],
                "compute_type": exported.translator.compute_type,
                "peak_rss_mib": peak_rss_mib(),  # the process peak so far
            }
            logging.info("%s: %.1f sentences/s", key, len(sources) / seconds)
            # the same export as a user runs it: its own process, one call
            standalone = ctranslate2_process(path, sources, dcfg, export_dir)
            hyps = standalone.pop("hypotheses")
            key = f"ct2_process_{name.removesuffix('_cached')}{suffix}"
            results[key] = {
                **standalone,
                "sentences_per_s": len(sources) / standalone["seconds"],
                "bleu": score_corpus(hyps, refs)["bleu"],
            }
            logging.info("%s: %.1f sentences/s", key, results[key]["sentences_per_s"])
    return results


def ctranslate2_process(export: Path, sources, dcfg, tmp: Path) -> dict:
    """scripts/bench_ct2.py on ``export``: seconds, texts, compute type, peak RSS."""
    import subprocess

    inputs, outputs = tmp / "sources.json", tmp / "ct2_out.json"
    inputs.write_text(json.dumps(sources), encoding="utf-8")
    k = dcfg.beam_size if dcfg.strategy == "beam" else 1
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_ct2.py"),
            str(export),
            str(inputs),
            str(outputs),
            f"--beam={k}",
            f"--threads={torch.get_num_threads()}",
            f"--max-batch-tokens={dcfg.max_tokens}",
        ],
        check=True,
    )
    return json.loads(outputs.read_text(encoding="utf-8"))


def bench_compiled_decoding(model, tokenizer, sources, refs, dcfg, device) -> dict:
    """decoding.compile: the first run (which compiles) and a second, timed."""
    from transformer.evaluation import score_corpus, translate

    dcfg = replace(dcfg, compile=True)
    start = time.perf_counter()
    translate(model, tokenizer, sources, dcfg, device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = translate(model, tokenizer, sources, dcfg, device)
    seconds = time.perf_counter() - start
    return {
        "first_run_seconds": first,
        "seconds": seconds,
        "sentences_per_s": len(sources) / seconds,
        "bleu": score_corpus([h[0].text for h in out], refs)["bleu"],
        "peak_rss_mib": peak_rss_mib(),
    }


def bench_decode(args) -> dict:
    from transformer.checkpoint import load_model, set_precision
    from transformer.data import read_pairs
    from transformer.evaluation import score_corpus, translate

    device = torch.device(args.device if args.device != "auto" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, tokenizer, _ = load_model(args.checkpoint, device)
    if args.data_dir:
        cfg.data.dir = args.data_dir
    pairs = list(read_pairs(cfg.data, args.split))[: args.limit or None]
    sources = [s for s, _ in pairs]
    refs = [t for _, t in pairs]
    lengths = {"max_len_a": cfg.decoding.max_len_a, "max_len_b": cfg.decoding.max_len_b}
    greedy_cfg = DecodingConfig(strategy="greedy", **lengths)
    runs = {
        "greedy_cached": (greedy_cfg, True),
        "greedy_uncached": (greedy_cfg, False),
        "beam5_cached": (
            DecodingConfig(strategy="beam", beam_size=5, length_penalty=1.0, **lengths),
            True,
        ),
    }
    results = {}
    if ctranslate2_available(args):  # exported before the model is cast to bf16
        with tempfile.TemporaryDirectory(prefix="bench-ct2-") as tmp:
            results.update(
                bench_ctranslate2(
                    model, tokenizer, sources, refs, runs, device, Path(tmp)
                )
            )
    for precision in sorted(set(args.precision), key=["fp32", "bf16"].index):
        set_precision(model, precision)  # fp32 runs first, on the loaded weights
        suffix = "" if precision == "fp32" else f"_{precision}"
        for name, (dcfg, use_cache) in runs.items():
            if suffix and not use_cache:
                continue  # the uncached reference is timed once, in float32
            translate(model, tokenizer, sources[:16], dcfg, device, use_cache)
            start = time.perf_counter()
            out = translate(model, tokenizer, sources, dcfg, device, use_cache)
            seconds = time.perf_counter() - start
            hyps = [h[0].text for h in out]
            results[name + suffix] = {
                "seconds": seconds,
                "sentences_per_s": len(sources) / seconds,
                "bleu": score_corpus(hyps, refs)["bleu"],
                "peak_rss_mib": peak_rss_mib(),
            }
            if not suffix:  # counted once, outside the timing (the count is slow)
                results[name]["model_gflop"] = decode_gflop(
                    lambda c=dcfg, u=use_cache: translate(
                        model, tokenizer, sources, c, device, u
                    )
                )
            results[name + suffix]["weights"] = str(next(model.parameters()).dtype)
            logging.info("%s: %.1f sentences/s", name + suffix, len(sources) / seconds)
            if args.compile and use_cache and not suffix:
                results[f"{name}_compile"] = bench_compiled_decoding(
                    model, tokenizer, sources, refs, dcfg, device
                )
    result = {
        "benchmark": "decode",
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "sentences": len(sources),
        "device": str(device),
        "runs": results,
    }
    if "greedy_cached" in results:
        greedy = results["greedy_cached"]["seconds"]
        result["cached_speedup_over_uncached"] = (
            results["greedy_uncached"]["seconds"] / greedy
        )
        result["beam5_time_over_greedy"] = results["beam5_cached"]["seconds"] / greedy
        result["beam5_model_flops_over_greedy"] = (
            results["beam5_cached"]["model_gflop"]
            / results["greedy_cached"]["model_gflop"]
        )
    # CTranslate2 time against ours in float32 (our KV-cached search), same sources
    speedups = {
        f"{name}{suffix}": results[f"{name}_cached"]["seconds"]
        / results[f"ct2_{name}{suffix}"]["seconds"]
        for name in ("greedy", "beam5")
        for suffix in ("", "_int8")
        if f"ct2_{name}{suffix}" in results and f"{name}_cached" in results
    }
    if speedups:
        result["ct2_speedup_over_torch_fp32"] = speedups
        result["ct2_process_speedup_over_torch_fp32"] = {
            f"{name}{suffix}": results[f"{name}_cached"]["seconds"]
            / results[f"ct2_process_{name}{suffix}"]["seconds"]
            for name in ("greedy", "beam5")
            for suffix in ("", "_int8")
        }
    if "greedy_cached_bf16" in results:
        greedy = results["greedy_cached_bf16"]["seconds"]
        result["bf16_beam5_time_over_greedy"] = (
            results["beam5_cached_bf16"]["seconds"] / greedy
        )
        if "greedy_cached" in results:
            result["bf16_speedup_over_fp32"] = {
                name: results[name]["seconds"] / results[f"{name}_bf16"]["seconds"]
                for name in ("greedy_cached", "beam5_cached")
            }
    result["machine"] = machine()
    return result


# options that count or time something: 0 makes no sense for these
_POSITIVE = {
    "updates", "max_tokens", "matmul_seconds", "minutes", "lanes", "clients",
    "rounds", "max_requests", "output_pieces", "validate_every", "format_batches",
    "sizes", "seconds",
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
        from transformer.training import resolve_device

        resolve_device(args.device, "--device")


def main(argv: list[str] | None = None) -> int:
    from transformer.cli import run_cli

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
        "--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"]
    )
    decode.add_argument(
        "--no-ctranslate2", action="store_true", help="skip the CTranslate2 rows"
    )
    decode.add_argument(
        "--compile", action="store_true", help="also time decoding.compile (fp32)"
    )
    for p in (train, decode):
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=0)
    bench_data.add_parser(sub)
    bench_serve.add_parser(sub)
    bench_compare.add_parser(sub)
    bench_quality.add_parser(sub)
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
    elif args.single:
        args.precision, args.compile = args.precision[0], args.compile[0]
        result = bench_train(args)
    else:
        result = bench_train_all(args)
    result["command"] = " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    output = Path(args.output or ROOT / "benchmarks" / f"{args.what}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {k: v for k, v in result.items() if not isinstance(v, list)}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
