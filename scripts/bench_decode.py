"""Decoding speed (``python scripts/benchmark.py decode``): ours with and without the
KV cache, greedy and beam 5, fp32 / bf16, compiled, and CTranslate2's exports of the
same weights (in this process, and as a user runs them: scripts/bench_ct2.py)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_common import machine, median_run, peak_rss_mib, sdpa_flop_mapping, timed

from transformer.allocator import reuse_freed_memory
from transformer.config import DecodingConfig

ROOT = Path(__file__).resolve().parents[1]


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
    model,
    tokenizer,
    sources,
    refs,
    runs,
    device,
    export_dir: Path,
    repeats=1,
    budgets: tuple[int, ...] = (),
) -> dict:
    """Export with float32 and int8 weights; time greedy and beam 5 of each (the
    median of ``repeats`` runs); the int8 export in its own process also with
    each batch budget of ``budgets`` (rows ``...@<budget>``)."""
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
            run = functools.partial(exported.translate, sources, dcfg)
            row, out = median_run(run, repeats)
            key = f"ct2_{name.removesuffix('_cached')}{suffix}"
            results[key] = {
                **row,
                "sentences_per_s": len(sources) / row["seconds"],
                "bleu": score_corpus([h[0].text for h in out], refs)["bleu"],
                "compute_type": exported.translator.compute_type,
                "peak_rss_mib": peak_rss_mib(),  # the process peak so far
            }
            logging.info("%s: %.1f sentences/s", key, results[key]["sentences_per_s"])
            # the same export as a user runs it: its own process, one call
            key = f"ct2_process_{name.removesuffix('_cached')}{suffix}"
            results[key] = ctranslate2_process(
                path, sources, refs, dcfg, export_dir, repeats
            )
            logging.info("%s: %.1f sentences/s", key, results[key]["sentences_per_s"])
            for budget in budgets if quantization else ():
                other = replace(dcfg, max_tokens=budget)
                results[f"{key}@{budget}"] = ctranslate2_process(
                    path, sources, refs, other, export_dir, repeats
                )
    return results


def ctranslate2_process(
    export: Path, sources, refs, dcfg, tmp: Path, repeats=1
) -> dict:
    """scripts/bench_ct2.py on ``export``: a row of seconds (the median of
    ``repeats`` runs), sentences/s, BLEU against ``refs``, compute type, peak RSS."""
    from transformer.evaluation import score_corpus

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
            f"--repeats={repeats}",
        ],
        check=True,
    )
    row = json.loads(outputs.read_text(encoding="utf-8"))
    hyps = row.pop("hypotheses")
    row["sentences_per_s"] = len(sources) / row["seconds"]
    row["bleu"] = score_corpus(hyps, refs)["bleu"]
    return row


def our_process(args, precision: str) -> dict:
    """``benchmark.py decode`` for ``precision`` alone in a fresh process,
    without CTranslate2: its rows."""
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        out = Path(tmp) / "rows.json"
        command = [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "decode",
            "--single",
            "--no-ctranslate2",
            f"--checkpoint={args.checkpoint}",
            f"--split={args.split}",
            f"--limit={args.limit}",
            f"--precision={precision}",
            "--max-tokens",
            *map(str, args.max_tokens),
            f"--repeats={args.repeats}",
            f"--device={args.device}",
            f"--threads={args.threads}",
            f"--output={out}",
        ]
        if args.data_dir:
            command.append(f"--data-dir={args.data_dir}")
        if args.compile:
            command.append("--compile")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text(encoding="utf-8"))["runs"]


def bench_compiled_decoding(
    model, tokenizer, sources, refs, dcfg, device, repeats=1
) -> dict:
    """decoding.compile: the first run (which compiles), then the median of
    ``repeats`` timed runs."""
    from transformer.inference import translate

    dcfg = replace(dcfg, compile=True)
    start = time.perf_counter()
    translate(model, tokenizer, sources, dcfg, device)
    first = time.perf_counter() - start
    row = timed(model, tokenizer, sources, refs, dcfg, device, repeats)
    return {"first_run_seconds": first, **row}


def bench_decode(args) -> dict:
    from transformer.data import read_pairs
    from transformer.inference import load_model, set_precision, translate

    device = torch.device(args.device if args.device != "auto" else "cpu")
    repeats = args.repeats
    reuse_freed_memory(single_arena=False)  # as Translator.load, for the CLIs
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, tokenizer, _ = load_model(args.checkpoint, device)
    if args.data_dir:
        cfg.data.dir = args.data_dir
    pairs = list(read_pairs(cfg.data, args.split))[: args.limit or None]
    sources = [s for s, _ in pairs]
    refs = [t for _, t in pairs]
    main_budget, *budgets = dict.fromkeys(args.max_tokens)  # in order, once each
    lengths = {
        "max_len_a": cfg.decoding.max_len_a,
        "max_len_b": cfg.decoding.max_len_b,
        "max_tokens": main_budget,
    }
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
                    model,
                    tokenizer,
                    sources,
                    refs,
                    runs,
                    device,
                    Path(tmp),
                    repeats,
                    tuple(budgets),
                )
            )
    precisions = sorted(set(args.precision), key=["fp32", "int8", "bf16"].index)
    if not args.single:
        # each precision in a process of its own, as a user decodes in one (and
        # as CTranslate2's process rows run): none inherits another's heap and
        # kernel caches, nor those of CTranslate2's in-process rows
        for precision in precisions:
            results.update(our_process(args, precision))
        precisions = []
    loaded = model
    for precision in precisions:
        # fp32 runs first, on the loaded weights; int8 quantizes a copy of them;
        # bf16 casts them, last
        model = copy.deepcopy(loaded) if precision == "int8" else loaded
        set_precision(model, precision)
        suffix = "" if precision == "fp32" else f"_{precision}"
        for name, (dcfg, use_cache) in runs.items():
            if suffix and not use_cache:
                continue  # the uncached reference: float32 only, timed once
            results[name + suffix] = timed(
                model,
                tokenizer,
                sources,
                refs,
                dcfg,
                device,
                repeats if use_cache else 1,
                use_cache,
            )
            seconds = results[name + suffix]["seconds"]
            if not suffix:  # counted once, outside the timing (the count is slow)
                results[name]["model_gflop"] = decode_gflop(
                    lambda c=dcfg, u=use_cache, m=model: translate(
                        m, tokenizer, sources, c, device, u
                    )
                )
            weights = str(next(model.parameters()).dtype)
            results[name + suffix]["weights"] = (
                "int8 linear layers" if precision == "int8" else weights
            )
            logging.info("%s: %.1f sentences/s", name + suffix, len(sources) / seconds)
            for budget in budgets if use_cache else ():
                key = f"{name}{suffix}@{budget}"
                results[key] = timed(
                    model,
                    tokenizer,
                    sources,
                    refs,
                    replace(dcfg, max_tokens=budget),
                    device,
                    repeats,
                )
                row = results[key]
                row["weights"] = results[name + suffix]["weights"]
                logging.info("%s: %.1f sentences/s", key, row["sentences_per_s"])
            if args.compile and use_cache and not suffix:
                results[f"{name}_compile"] = bench_compiled_decoding(
                    model, tokenizer, sources, refs, dcfg, device, repeats
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
    if "greedy_cached_int8" in results and "greedy_cached" in results:
        result["int8_speedup_over_fp32"] = {
            name: results[name]["seconds"] / results[f"{name}_int8"]["seconds"]
            for name in ("greedy_cached", "beam5_cached")
        }
        if speedups:  # our int8 against CTranslate2's int8, same sources
            result["torch_int8_speedup_over_ct2_int8"] = {
                name: results[f"ct2_{name}_int8"]["seconds"]
                / results[f"{name}_cached_int8"]["seconds"]
                for name in ("greedy", "beam5")
            }
    # our fastest precision against CTranslate2's int8 in its own process: at
    # the main batch budget, and each engine at its fastest budget
    best, same = {}, {}

    def at(budget: int) -> str:  # the key suffix of a budget's rows
        return "" if budget == main_budget else f"@{budget}"

    for name in ("greedy", "beam5"):
        ours = {
            (p, b): results[f"{name}_cached{s}{at(b)}"]
            for p, s in (("fp32", ""), ("int8", "_int8"), ("bf16", "_bf16"))
            for b in args.max_tokens
            if f"{name}_cached{s}{at(b)}" in results
        }
        theirs = {
            b: results[f"ct2_process_{name}_int8{at(b)}"]
            for b in args.max_tokens
            if f"ct2_process_{name}_int8{at(b)}" in results
        }
        if not (ours and theirs):
            continue
        at_main = [k for k in ours if k[1] == main_budget]
        fastest = min(at_main, key=lambda k: ours[k]["seconds"])
        same[name] = {
            "precision": fastest[0],
            "max_tokens": main_budget,
            "speedup": theirs[main_budget]["seconds"] / ours[fastest]["seconds"],
        }
        fastest = min(ours, key=lambda k: ours[k]["seconds"])
        their_best = min(theirs, key=lambda b: theirs[b]["seconds"])
        best[name] = {
            "precision": fastest[0],
            "max_tokens": fastest[1],
            "ct2_max_tokens": their_best,
            "speedup": theirs[their_best]["seconds"] / ours[fastest]["seconds"],
        }
    if best:
        result["best_speedup_over_ct2_process_int8"] = best
        result["speedup_over_ct2_process_int8_same_budget"] = same
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
