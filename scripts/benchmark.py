"""Speed benchmarks: training throughput and decoding speed, written as JSON.

Training (the reference small model of ../shared/bench/joeynmt_peer.sh: d_model 256,
3+3 layers, 4 heads, d_ff 1024, pre-norm, 8k joint SentencePiece, 4,096-token
batches, Multi30k de->en), reported like the peer script: the median target tokens
per second over windows of 25 updates, the first window skipped:

    python scripts/benchmark.py train --peer --precision fp32 bf16

With --peer it first runs ../shared/bench/joeynmt_peer.sh with the same number of
updates, so that the ratio against JoeyNMT 2.3.0 is measured in one sitting. Each
precision runs in its own process, so that each peak RSS is its own.

The corpus store at 1x / 10x / 100x Multi30k (preprocessing, bytes per token, time
to the first update, peak RSS) and numpy files against Arrow (scripts/bench_data.py):

    python scripts/benchmark.py data

Decoding of Multi30k test_2016_flickr with a trained checkpoint: sentences per
second for greedy with and without the KV cache and for beam 5, in one run:

    python scripts/benchmark.py decode --checkpoint checkpoints/multi30k_de_en/best.pt

With --precision fp32 bf16 the same run also times the model cast to bf16
(decoding.precision: bf16) and reports its speed-up; peak RSS is the process peak
so far, so a bf16 run's figure includes the float32 runs before it.

When ctranslate2 is installed (pip install -e ".[export]"; --no-ctranslate2 skips
it), the checkpoint is also exported to CTranslate2 with float32 and int8 weights and
each export decodes the same sources greedily and with beam 5 (alpha 1.0), on the
same number of threads, through transformer.export.ExportedModel.

Serving: ``transformer-serve`` on 127.0.0.1 in a subprocess, Multi30k test sentences
sent by 32 concurrent clients for a bounded time, against the same sentences sent one
at a time; sentences per second and p50 / p95 latency, for each batching window
(``--max-wait-ms``, one server each):

    python scripts/benchmark.py serve --clients 32 --seconds 30 --max-wait-ms 5 20

Without --checkpoint it serves a model of the reference Multi30k size with seeded
random weights and a SentencePiece model trained on the Multi30k training text, and
every sentence decodes to a fixed number of pieces: it measures serving and batching
throughput, not translation quality.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import itertools
import json
import logging
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_data  # noqa: E402  (scripts/bench_data.py)

from transformer.config import DecodingConfig, load_config  # noqa: E402

WINDOW = 25  # updates per throughput window, as in the peer script
PEER = ROOT.parent / "shared" / "bench" / "joeynmt_peer.sh"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def bench_train(args) -> dict:
    from transformer.training import Trainer

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-train-"))
    overrides = [
        f"data.dir={args.data_dir}",
        f"training.run_dir={run_dir}",
        f"training.precision={args.precision}",
        f"training.device={args.device}",
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
    windows, tokens, steps = [], 0, 0
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
            now = time.perf_counter()
            windows.append(tokens / (now - start))
            tokens, start = 0, now
    measured = windows[1:] if len(windows) > 1 else windows
    return {
        "benchmark": "train",
        "model": "d256 3+3 4h ff1024 pre-norm, 8k joint unigram, Multi30k de-en",
        "precision": args.precision,
        "device": str(trainer.device),
        "max_tokens": args.max_tokens,
        "updates": args.updates,
        "target_tokens_per_s_median": statistics.median(measured),
        "target_tokens_per_s_windows": measured,
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
    """The peer (when asked) then each precision in a fresh process."""
    result = {
        "benchmark": "train",
        "peer": run_peer(args.updates) if args.peer else None,
    }
    runs = {}
    for precision in args.precision:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, __file__, "train", "--single", "--output", tmp.name]
            cmd += ["--precision", precision, "--updates", str(args.updates)]
            cmd += ["--data-dir", args.data_dir, "--max-tokens", str(args.max_tokens)]
            cmd += ["--device", args.device, "--threads", str(args.threads)]
            if args.run_dir:
                cmd += ["--run-dir", args.run_dir]
            subprocess.run([*cmd, *args.overrides], check=True)
            runs[precision] = json.loads(Path(tmp.name).read_text())
    result["runs"] = runs
    if result["peer"]:
        peer = result["peer"]["target_tokens_per_s_median"]
        result["ratio_over_peer"] = {
            p: r["target_tokens_per_s_median"] / peer for p, r in runs.items()
        }
    return result


def decode_gflop(decode) -> float:
    """Model FLOPs of one call of ``decode()``: matrix products and attention, GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    def attention(q, k, v, *args, **kwargs) -> int:  # shapes (B, H, T, Dh)
        b, h, tq, d = q
        return 2 * 2 * b * h * tq * k[2] * d  # q k^T and weights @ v

    # the CPU flash-attention kernel has no formula in torch's table
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with FlopCounterMode(display=False, custom_mapping={cpu_sdpa: attention}) as count:
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
    return results


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
            logging.info("%s: %.1f sentences/s", name + suffix, len(sources) / seconds)
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


def random_multi30k_checkpoint(args, folder: Path) -> tuple[Path, dict]:
    """The reference Multi30k model (configs/multi30k_de_en.yaml) with seeded random
    weights and a joint SentencePiece model trained on the Multi30k training text;
    greedy decoding of exactly ``args.output_pieces`` pieces per sentence."""
    from transformer.checkpoint import FORMAT_VERSION, atomic_save
    from transformer.model import Transformer
    from transformer.tokenizer import Tokenizer

    cfg = load_config(ROOT / "configs" / "multi30k_de_en.yaml")
    data = Path(args.data_dir)
    text = {}
    for lang in (cfg.data.src_lang, cfg.data.tgt_lang):
        with gzip.open(data / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
            text[lang] = f.read().splitlines()
    start = time.perf_counter()
    tokenizer = Tokenizer.train(
        cfg.data.tokenizer, text[cfg.data.src_lang], text[cfg.data.tgt_lang]
    )
    logging.info("SentencePiece trained in %.1f s", time.perf_counter() - start)
    cfg.model.src_vocab_size = tokenizer.src_vocab_size
    cfg.model.tgt_vocab_size = tokenizer.tgt_vocab_size
    # <eos> is banned before output_pieces and forced right after
    cfg.decoding = DecodingConfig(
        strategy="greedy",
        max_len_a=0.0,
        max_len_b=args.output_pieces + 1,
        min_len=args.output_pieces,
    )
    torch.manual_seed(args.seed)
    model = Transformer(cfg.model)
    path = folder / "multi30k_random.pt"
    atomic_save(
        {
            "format": FORMAT_VERSION,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "tokenizer": tokenizer.state_dict(),
            "step": 0,
        },
        path,
    )
    described = {
        "checkpoint": "generated: configs/multi30k_de_en.yaml model section "
        f"(d_model {cfg.model.d_model}, {cfg.model.encoder_layers}+"
        f"{cfg.model.decoder_layers} layers, {cfg.model.n_heads} heads, d_ff "
        f"{cfg.model.d_ff}), seeded random weights (seed {args.seed}), not trained",
        "tokenizer": f"joint {cfg.data.tokenizer.model_type} SentencePiece, "
        f"{tokenizer.src_vocab_size} pieces, trained on Multi30k train.de + train.en",
        "decoding": f"greedy, exactly {args.output_pieces} output pieces per "
        "sentence (min_len / max_len_b), so that every request does the same work",
        "measures": "serving and batching throughput, not translation quality",
    }
    return path, described


def _post(conn: http.client.HTTPConnection, body: dict) -> dict:
    conn.request(
        "POST", "/translate", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
    return json.loads(data)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load_phase(port, sentences, pair, clients, seconds, max_requests) -> dict:
    """``clients`` threads, each with its own keep-alive connection, send one
    sentence a request (cycling through ``sentences``) until ``seconds`` pass or
    ``max_requests`` have been sent."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    outputs: dict[int, set[str]] = {}
    deadline = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while time.perf_counter() < deadline:
                n = next(counter)
                if n >= max_requests:
                    return
                i = n % len(sentences)
                start = time.perf_counter()
                try:
                    body = _post(conn, {"q": sentences[i], **pair})
                except (OSError, RuntimeError, http.client.HTTPException) as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)
                    outputs.setdefault(i, set()).add(body["translatedText"])
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "seconds": seconds,
        "latencies": latencies,
        "errors": errors,
        "outputs": outputs,
    }


def summarize(phases: list[dict]) -> dict:
    """Sentences/s and latency percentiles over the rounds of one kind of phase."""
    latencies = [x for p in phases for x in p["latencies"]]
    seconds = sum(p["seconds"] for p in phases)
    errors = [e for p in phases for e in p["errors"]]
    return {
        "clients": phases[0]["clients"],
        "rounds": len(phases),
        "sentences": len(latencies),
        "seconds": seconds,
        "sentences_per_s": len(latencies) / seconds,
        "sentences_per_s_by_round": [
            len(p["latencies"]) / p["seconds"] for p in phases
        ],
        "latency_p50_ms": 1000 * _percentile(latencies, 0.50) if latencies else None,
        "latency_p95_ms": 1000 * _percentile(latencies, 0.95) if latencies else None,
        "errors": len(errors),
        "first_errors": errors[:5],
    }


def serve_run(args, checkpoint: Path, sentences, pair, max_wait_ms: float) -> dict:
    """One server with one batching window: one client, then ``args.clients``, in
    alternating rounds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "transformer.serve", "--checkpoint", str(checkpoint)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += ["--max-wait-ms", str(max_wait_ms), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                _get(url + "/health")
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        load_phase(port, sentences, pair, 4, 3.0, 200)  # warm-up
        # rounds alternate the two phases, so that other work on a shared machine
        # slows both alike
        load_average = [os.getloadavg()[0]]
        ones, manys = [], []
        batches = requests = 0
        seconds = args.seconds / args.rounds
        for _ in range(args.rounds):
            ones.append(load_phase(port, sentences, pair, 1, seconds, len(sentences)))
            before = _get(url + "/health")
            manys.append(
                load_phase(
                    port, sentences, pair, args.clients, seconds, args.max_requests
                )
            )
            after = _get(url + "/health")
            batches += after["batches"] - before["batches"]
            requests += after["requests"] - before["requests"]
        load_average.append(os.getloadavg()[0])
    finally:
        server.terminate()
        server.wait(timeout=60)
    # the same sentence must come back the same, batched or not
    texts: dict[int, set[str]] = {}
    for phase in ones + manys:
        for i, outputs in phase["outputs"].items():
            texts.setdefault(i, set()).update(outputs)
    differ = sum(len(outputs) > 1 for outputs in texts.values())
    one, many = summarize(ones), summarize(manys)
    many["server_batches"] = batches
    many["requests_per_batch"] = requests / max(batches, 1)
    many["largest_batch_sentences"] = after["largest_batch"]
    logging.info(
        "max_wait %g ms: %.1f sentences/s one at a time, %.1f with %d clients",
        max_wait_ms,
        one["sentences_per_s"],
        many["sentences_per_s"],
        args.clients,
    )
    return {
        "max_wait_ms": max_wait_ms,
        "one_at_a_time": one,
        "concurrent": many,
        "throughput_over_one_at_a_time": many["sentences_per_s"]
        / one["sentences_per_s"],
        "sentences_whose_output_differed": differ,
        "load_average_1min_before_after": load_average,
    }


def bench_serve(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
            described = {"checkpoint": args.checkpoint}
        else:
            checkpoint, described = random_multi30k_checkpoint(args, workdir)
        from transformer.checkpoint import checkpoint_config, load_checkpoint

        cfg = checkpoint_config(load_checkpoint(checkpoint), checkpoint)
        pair = {"source": cfg.data.src_lang, "target": cfg.data.tgt_lang}
        path = Path(args.data_dir) / f"{args.split}.{pair['source']}.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            sentences = f.read().splitlines()[: args.limit or None]
        runs = {
            f"max_wait_{wait:g}ms": serve_run(args, checkpoint, sentences, pair, wait)
            for wait in args.max_wait_ms
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "serve",
        **described,
        "sentences_from": f"Multi30k {args.split}.{pair['source']} "
        f"({len(sentences)} sentences, cycled), one sentence a request",
        "clients": args.clients,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "runs": runs,
        "device": args.device,
        "server_threads": args.threads or "all cores (torch default)",
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
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
    serve = sub.add_parser("serve", help="server throughput and latency")
    serve.add_argument("--checkpoint", help="default: a random Multi30k-size model")
    serve.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/multi30k"))
    serve.add_argument("--split", default="test_2016_flickr")
    serve.add_argument("--limit", type=int, default=0, help="first N sentences only")
    serve.add_argument("--clients", type=int, default=32)
    serve.add_argument(
        "--seconds", type=float, default=30.0, help="per phase, all rounds together"
    )
    serve.add_argument("--rounds", type=int, default=3, help="alternations")
    serve.add_argument("--max-requests", type=int, default=20_000)
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        nargs="+",
        default=[5.0, 20.0],
        help="batching windows, one server each",
    )
    serve.add_argument("--output-pieces", type=int, default=20)
    serve.add_argument("--seed", type=int, default=0)
    for p in (train, decode, serve):
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=0)
    bench_data.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--output", help="JSON file (default: benchmarks/<what>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.what == "data":
        result = bench_data.bench_data(args)
    elif args.what == "decode":
        result = bench_decode(args)
    elif args.what == "serve":
        result = bench_serve(args)
    elif args.single:
        args.precision = args.precision[0]
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
