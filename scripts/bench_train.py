"""The training-throughput benchmark (``python scripts/benchmark.py train``): our
trainer on the peer's reference model, JoeyNMT's script, and the arithmetic rate."""

from __future__ import annotations

import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import (
    machine,
    matmul_gflops,
    peak_rss_mib,
    products_alone,
    recorded_products,
    sdpa_flop_mapping,
)

from transformer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "scripts" / "benchmark.py"
WINDOW = 25  # updates per throughput window, as in the peer script
#: seconds of the reference 1024-wide product timed after each window, so that
#: each window's rate is set against the host's speed of that minute (a shared
#: host's speed drifts by 10-30% within a sitting)
MATMUL_BURST_SECONDS = 0.5
PEER = ROOT.parent / "shared" / "bench" / "joeynmt_peer.sh"


def first_batch_step(trainer):
    """One forward and backward pass over the first batch, as a function to run
    under a counter or a recorder (call ``model.zero_grad`` after it), and that
    batch's target tokens."""
    from transformer.training.loss import forward_loss

    t = trainer.cfg.training
    _, _, batch = next(trainer._batches())
    batch = batch.to(trainer.device)

    def step() -> None:
        loss = forward_loss(
            trainer.model,
            batch.src,
            batch.tgt_in,
            batch.tgt_out,
            trainer.device,
            trainer.precision,
            t.label_smoothing,
            t.loss_chunk_rows,
        )
        loss.backward()

    return step, batch.n_tokens


def train_flops_per_token(trainer) -> tuple[float, int]:
    """Model FLOPs (matrix products and attention) of one forward and backward
    pass per target token, counted on the first batch, and its target tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    step, tokens = first_batch_step(trainer)
    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as count:
        step()
    trainer.model.zero_grad(set_to_none=True)
    return count.get_total_flops() / tokens, tokens


def products_ceiling(trainer) -> dict:
    """The step's own matrix products timed alone (``products_alone``) on the
    first batch: their rate, and the share of a measured step they would take
    if nothing else ran. With attention and the elementwise work at no cost the
    model would reach about this rate: the ceiling of ``fraction_of_matmul_1024``
    at this model's shapes."""
    step, tokens = first_batch_step(trainer)
    calls = recorded_products(step)
    trainer.model.zero_grad(set_to_none=True)
    flops, seconds = products_alone(calls, trainer.device)
    return {
        "products_per_step": len(calls),
        "products_gflops_per_s": flops / seconds / 1e9,
        "products_seconds_per_target_token": seconds / tokens,
    }


def measured_windows(
    windows: list[float], bursts: list[float]
) -> tuple[list[float], list[float]]:
    """The measured windows' rates (the first window, with the warm-up, left out
    when there are more) and the product's rate timed after each of them."""
    skip = 1 if len(windows) > 1 else 0
    return windows[skip:], bursts[skip:]


def fraction_by_window(
    rates: list[float], bursts: list[float], flops_per_token: float
) -> float | None:
    """The median over windows of the model's rate (``rates``: target tokens/s)
    against the product's rate timed after that window; None without bursts."""
    fractions = [
        flops_per_token * rate / 1e9 / burst
        for rate, burst in zip(rates, bursts, strict=False)
    ]
    return statistics.median(fractions) if fractions else None


def bench_train(args) -> dict:
    from transformer.training import Trainer

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-train-"))
    overrides = [
        f"data.dir={args.data_dir}",
        f"training.run_dir={run_dir}",
        f"training.precision={args.precision}",
        f"training.device={args.device}",
        f"training.compile={str(args.compile == 'on').lower()}",
        f"data.max_tokens={args.max_tokens}",
        # the peer's reference model and optimiser settings
        "model.d_model=256",
        "model.n_heads=4",
        "model.encoder_layers=3",
        "model.decoder_layers=3",
        "model.d_ff=1024",
        "model.norm_first=true",
        "model.dropout=0.1",
        "model.attention_dropout=0.1",
        "data.tokenizer.vocab_size=8000",
        "data.tokenizer.model_type=unigram",
        "training.schedule=inverse_sqrt",
        "training.lr=0.0007",
        "training.warmup_steps=1000",
        "training.label_smoothing=0.1",
        "training.clip_grad_norm=1.0",
        "training.resume=never",
        "training.tensorboard=false",
        *args.overrides,
    ]
    if args.threads:
        overrides.append(f"training.threads={args.threads}")
    cfg = load_config(ROOT / "configs" / "multi30k_de_en.yaml", overrides)
    trainer = Trainer(cfg, resume=False)
    trainer.model.train()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    matmul_dtype = dtype[trainer.precision]
    windows, bursts, tokens, steps = [], [], 0, 0
    batches = trainer._batches()
    pending = []
    start = time.perf_counter()
    while steps < args.updates:
        _, _, batch = next(batches)
        pending.append(batch)
        if len(pending) < cfg.training.accumulate:
            continue
        result = trainer.train_step(pending)
        pending = []
        steps += 1
        tokens += 0 if result.skipped else result.tokens
        if steps % WINDOW == 0:
            windows.append(tokens / (time.perf_counter() - start))
            # outside the window's time
            bursts.append(
                matmul_gflops(trainer.device, matmul_dtype, MATMUL_BURST_SECONDS)
            )
            tokens, start = 0, time.perf_counter()
    if not windows:  # a short (smoke) run: all its updates are one window
        windows.append(tokens / (time.perf_counter() - start))
    measured, paired = measured_windows(windows, bursts)
    speed = statistics.median(measured)
    # after the timing, so that the timed updates are those of an ordinary run
    flops_per_token, flops_tokens = train_flops_per_token(trainer)
    matmul = matmul_gflops(trainer.device, matmul_dtype, args.matmul_seconds)
    achieved = flops_per_token * speed / 1e9
    ceiling = products_ceiling(trainer)
    return {
        "benchmark": "train",
        "model": "d256 3+3 4h ff1024 pre-norm, 8k joint unigram, Multi30k de-en",
        "precision": args.precision,
        "precision_effective": trainer.precision,  # bf16 without native bf16: fp32
        "compile": cfg.training.compile,
        "sampling_alpha": cfg.data.tokenizer.sampling_alpha,  # 0: one segmentation
        "sampling_nbest": cfg.data.tokenizer.sampling_nbest,
        "data_workers": cfg.data.workers,
        "device": str(trainer.device),
        "max_tokens": args.max_tokens,
        "updates": args.updates,
        "target_tokens_per_s_median": speed,
        "target_tokens_per_s_windows": measured,
        "model_flops_per_target_token": flops_per_token,
        "model_flops_counted_on_target_tokens": flops_tokens,
        "model_gflops_per_s": achieved,
        "matmul_1024_dtype": str(matmul_dtype).removeprefix("torch."),
        "matmul_1024_gflops_per_s": matmul,
        "fraction_of_matmul_1024": achieved / matmul,
        "matmul_1024_gflops_per_s_after_windows": paired,
        # each measured window against the product timed right after it
        "fraction_of_matmul_1024_by_window": fraction_by_window(
            measured, paired, flops_per_token
        ),
        "mfu": achieved / (args.peak_tflops * 1e3) if args.peak_tflops else None,
        # the step's own products, timed alone: their rate against the 1024-wide
        # product's, and the share of the measured step they alone would take
        "products_alone_gflops_per_s": ceiling["products_gflops_per_s"],
        "products_alone_of_matmul_1024": ceiling["products_gflops_per_s"] / matmul,
        "products_alone_share_of_step": (
            ceiling["products_seconds_per_target_token"] * speed
        ),
        "products_per_step": ceiling["products_per_step"],
        "padding_efficiency": trainer.train_data.efficiency(0),
        "peak_rss_mib": peak_rss_mib(),
        "cuda_max_allocated_mib": (
            torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available()
            else None
        ),
        "machine": machine(),
    }


def run_peer(updates: int) -> dict:
    """JoeyNMT 2.3.0 on the same model, data and batch size (its own script)."""
    logging.info("running %s %d (JoeyNMT 2.3.0)", PEER, updates)
    out = subprocess.run(
        ["bash", str(PEER), str(updates)], capture_output=True, text=True, check=False
    )
    found = re.search(r"tokens/s \(median of (\d+) windows.*?\): (\d+)", out.stdout)
    if out.returncode != 0 or not found:
        raise SystemExit(f"{PEER}: failed\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return {
        "name": "joeynmt-2.3.0",
        "command": f"bash {PEER.relative_to(ROOT.parent)} {updates}",
        "windows": int(found.group(1)),
        "target_tokens_per_s_median": float(found.group(2)),
    }


def bench_train_all(args) -> dict:
    """The peer (when asked) then each precision (and compile setting, and
    subword sampling alpha) in a fresh process."""
    result = {
        "benchmark": "train",
        "peer": run_peer(args.updates) if args.peer else None,
    }
    runs = {}
    settings = [
        (precision, compile, alpha)
        for precision in args.precision
        for compile in args.compile
        for alpha in args.sampling_alpha
    ]
    for precision, compile, alpha in settings:
        name = precision if compile == "off" else f"{precision}_compile"
        name += f"_sampling{alpha:g}" if alpha else ""
        sampling = [f"data.tokenizer.sampling_alpha={alpha:g}"] if alpha else []
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, str(BENCHMARK), "train", "--single"]
            cmd += ["--output", tmp.name, "--compile", compile]
            cmd += ["--precision", precision, "--updates", str(args.updates)]
            cmd += ["--data-dir", args.data_dir]
            cmd += ["--max-tokens", str(args.max_tokens)]
            cmd += ["--device", args.device, "--threads", str(args.threads)]
            cmd += ["--matmul-seconds", str(args.matmul_seconds)]
            cmd += ["--peak-tflops", str(args.peak_tflops)]
            if args.run_dir:
                cmd += ["--run-dir", args.run_dir]
            subprocess.run([*cmd, *args.overrides, *sampling], check=True)
            runs[name] = json.loads(Path(tmp.name).read_text())
    result["runs"] = runs
    if result["peer"]:
        peer = result["peer"]["target_tokens_per_s_median"]
        result["ratio_over_peer"] = {
            p: r["target_tokens_per_s_median"] / peer for p, r in runs.items()
        }
    return result
