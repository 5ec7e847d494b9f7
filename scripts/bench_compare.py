"""The three architectures on equal budgets: Multi30k de->en, each system trained
for the same minutes of updates (``training.max_minutes``) with the same data,
tokenizer, batches and schedule, then scored on test_2016_flickr.

    python scripts/benchmark.py compare --minutes 20 --lanes 2 \
        --systems transformer rnn_soft rnn_none decoder_only

Each system is one ``transformer-train`` run of configs/multi30k_de_en.yaml with
the overrides in ``SYSTEMS`` (a similar parameter count for each), then
``transformer-eval`` greedy and beam 5 on its last checkpoint. ``--lanes 2`` runs
two systems at a time, each on one thread (``training.threads=1``,
OMP_NUM_THREADS=1 for decoding), so every system gets the same share of a
2-core machine. Reported per system: parameters, updates, target tokens/s
(median of the logged windows), test BLEU greedy / beam 5, decoding sentences/s,
and beam-5 BLEU by source length in words (1-10, 11-20, 21+).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "multi30k_de_en.yaml"

# d_model 256 embeddings and an 8k joint vocabulary everywhere; the sizes below
# bring each system near the Transformer's 7.6M parameters
RNN = ["model.arch=rnn", "model.rnn_hidden=512", "model.encoder_layers=2"]
RNN += ["model.decoder_layers=1"]
SYSTEMS: dict[str, list[str]] = {
    "transformer": [],
    "rnn_soft": [*RNN, "model.attention=soft"],
    "rnn_hard": [*RNN, "model.attention=hard"],
    "rnn_none": [*RNN, "model.attention=none"],
    "decoder_only": ["model.arch=decoder_only", "model.decoder_layers=7"],
}
# short runs: half the config's batch for twice the updates, and a schedule that
# peaks early (the config's 1,000-update warm-up is longer than these runs)
COMMON = [
    "training.max_steps=1000000",
    "training.warmup_steps=200",
    "data.max_tokens=2048",
    "training.validate_every=1000000",
    "training.save_every=0",
    "training.patience=0",
    "training.log_every=10",
    "training.tensorboard=false",
]
BUCKETS = ((1, 10), (11, 20), (21, 10**9))


def _run(command: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("a", encoding="utf-8") as out:
        subprocess.run(command, check=True, stdout=out, stderr=out, env=env, cwd=ROOT)


def train_system(name: str, out: Path, minutes: float, threads: int) -> Path:
    run = out / name
    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--config",
        str(CONFIG),
        f"training.run_dir={run}",
        f"data.cache_dir={out / 'cache'}",
        f"training.max_minutes={minutes}",
        f"training.threads={threads}",
        *COMMON,
        *SYSTEMS[name],
    ]
    if (out / "spm.model").exists():
        command.append(f"data.tokenizer.model={out / 'spm.model'}")
    run.mkdir(parents=True, exist_ok=True)
    _run(command, run / "train.log", threads)
    return run / "last.pt"


def evaluate(checkpoint: Path, strategy: list[str], tag: str, threads: int) -> dict:
    output = checkpoint.with_suffix(f".{tag}.hyp")
    command = [
        sys.executable,
        str(ROOT / "scripts" / "eval.py"),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(output),
        *strategy,
    ]
    _run(command, checkpoint.parent / "eval.log", threads)
    return json.loads(output.with_suffix(".hyp.json").read_text(encoding="utf-8"))


def length_buckets(hyp_file: Path, data_dir: Path) -> dict[str, dict]:
    """BLEU of the sentences whose source has 1-10, 11-20 and 21+ words."""
    import gzip

    import sacrebleu

    def lines(path: Path) -> list[str]:
        return gzip.open(path, "rt", encoding="utf-8").read().splitlines()

    src = lines(data_dir / "test_2016_flickr.de.gz")
    ref = lines(data_dir / "test_2016_flickr.en.gz")
    hyp = hyp_file.read_text(encoding="utf-8").splitlines()
    result = {}
    for low, high in BUCKETS:
        rows = [i for i, s in enumerate(src) if low <= len(s.split()) <= high]
        name = f"{low}-{high}" if high < 10**9 else f"{low}+"
        bleu = sacrebleu.corpus_bleu([hyp[i] for i in rows], [[ref[i] for i in rows]])
        result[name] = {"sentences": len(rows), "bleu": round(bleu.score, 2)}
    return result


def summarize(name: str, run: Path, greedy: dict, beam: dict, data_dir: Path) -> dict:
    rows = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    train = [r for r in rows if r["type"] == "train"]
    from transformer.inference import load_model
    from transformer.models import count_parameters

    model, cfg, _, ckpt = load_model(run / "last.pt")
    return {
        "system": name,
        "overrides": SYSTEMS[name],
        "parameters": count_parameters(model),
        "updates": ckpt["step"],
        "train_minutes": round(ckpt["train_seconds"] / 60, 2),
        "target_tokens_per_s": round(
            statistics.median(r["tokens_per_s"] for r in train[1:] or train), 1
        ),
        "bleu_greedy": round(greedy["scores"]["bleu"], 2),
        "bleu_beam5": round(beam["scores"]["bleu"], 2),
        "greedy_sentences_per_s": round(greedy["sentences_per_s"], 2),
        "beam5_sentences_per_s": round(beam["sentences_per_s"], 2),
        "bleu_signature": beam["scores"]["bleu_signature"],
        "beam5_by_source_words": length_buckets(Path(beam["hypotheses"]), data_dir),
    }


def prepare(out: Path, threads: int) -> None:
    """Train the shared tokenizer and build the corpus store once."""
    if (out / "spm.model").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "scripts" / "preprocess.py"),
        "--config",
        str(CONFIG),
        f"training.run_dir={out}",
        f"data.cache_dir={out / 'cache'}",
    ]
    _run(command, out / "preprocess.log", threads)


def bench_compare(args) -> dict:
    out = Path(args.out)
    data_dir = Path(args.data_dir)
    threads = max(1, (os.cpu_count() or 2) // args.lanes)
    prepare(out, os.cpu_count() or 2)
    names = args.systems or list(SYSTEMS)
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {sorted(SYSTEMS)}")

    def one(name: str) -> dict:
        start = time.perf_counter()
        last = out / name / "last.pt"
        if not last.exists():
            last = train_system(name, out, args.minutes, threads)
        greedy = evaluate(last, ["--greedy"], "greedy", threads)
        beam = evaluate(last, ["--beam", "5"], "beam5", threads)
        row = summarize(name, out / name, greedy, beam, data_dir)
        row["wall_minutes"] = round((time.perf_counter() - start) / 60, 1)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(args.lanes) as pool:
        rows = list(pool.map(one, names))
    return {
        "task": "Multi30k de->en, test_2016_flickr",
        "budget_minutes": args.minutes,
        "lanes": args.lanes,
        "threads_per_system": threads,
        "systems": rows,
    }


def add_parser(sub) -> None:
    compare = sub.add_parser("compare", help="the architectures on equal budgets")
    compare.add_argument("--minutes", type=float, default=12.0, help="per system")
    compare.add_argument("--lanes", type=int, default=2, help="systems at a time")
    compare.add_argument(
        "--systems", nargs="+", help=f"default: all of {list(SYSTEMS)}"
    )
    compare.add_argument("--out", default=str(ROOT / "checkpoints" / "compare"))
    compare.add_argument(
        "--data-dir", default=str(ROOT.parent / "shared" / "data" / "multi30k")
    )
