"""The serving benchmark (``python scripts/benchmark.py serve``).

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

import gzip
import http.client
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from bench_common import ROOT, machine

from transformer.config import DecodingConfig, load_config


def random_multi30k_checkpoint(args, folder: Path) -> tuple[Path, dict]:
    """The reference Multi30k model (configs/multi30k_de_en.yaml) with seeded random
    weights and a joint SentencePiece model trained on the Multi30k training text;
    greedy decoding of exactly ``args.output_pieces`` pieces per sentence."""
    from transformer.checkpoint import FORMAT_VERSION, atomic_save
    from transformer.models import Transformer
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


def add_parser(sub) -> None:
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
    serve.add_argument("--device", default="auto")
    serve.add_argument("--threads", type=int, default=0)
