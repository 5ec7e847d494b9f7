"""The data benchmark (``python scripts/benchmark.py data``): the corpus store at
1x / 10x / 100x Multi30k, and numpy files against Arrow for the store's format.

For each size it writes the Multi30k training set repeated N times (gzipped, in a
temporary folder, never committed), then in fresh processes:

- ``transformer-preprocess``: wall time, pairs per second, store bytes per token;
- a training run of a few updates with the store warm (reference Multi30k model,
  the tokenizer given): time from process start to the end of the first update,
  and the process's peak RSS;
- opening the store as training does, with its self-check: the sizes against
  ``meta.json`` alone (``open_sizes_s``) and with the checksum of every array
  (``open_verify_s``), best of three in a fresh process, page cache warm (the
  store was just written), plus mapping it (block offsets summed).

The format comparison builds a Hugging Face ``datasets`` (Arrow) copy of the 10x
store and times, each in a fresh process: opening, RSS after opening, and gathering
the same random batches into padded arrays.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "multi30k_de_en.yaml"

# a training run of a few updates; prints JSON (time to first update, peak RSS)
TRAIN_RUN = r"""
import time
start = time.perf_counter()
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from transformer.config import load_config
from transformer.training import Trainer
cfg = load_config(sys.argv[2], sys.argv[4:])
trainer = Trainer(cfg, resume=False)
first = []
step = trainer.train_step
def timed(*a, **k):
    out = step(*a, **k)
    if not first:
        first.append(time.perf_counter() - start)
    return out
trainer.train_step = timed
trainer.train()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"first_update_s": first[0], "peak_rss_mib": rss,
                  "pairs": trainer.n_train, "updates": int(sys.argv[3])}))
"""

# open a store as training does, checking it (sizes, then sizes and checksums)
VERIFY_RUN = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from transformer.data import CorpusStore
path = Path(sys.argv[2])
out = {}
for key, checksums in (("open_sizes_s", False), ("open_verify_s", True)):
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        assert CorpusStore.problems_of(path, checksums) == []
        store = CorpusStore(path)
        store.lengths("src"), store.lengths("tgt")  # maps, sums the block offsets
        best = min(best, time.perf_counter() - start)
    out[key] = best
print(json.dumps(out))
"""

# open a store (numpy or Arrow), gather batches; prints JSON
FORMAT_RUN = r"""
import time, json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import datasets  # both libraries imported before anything is timed
from transformer.data import CorpusStore
kind, path, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
def rss():  # resident now, MiB
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss()
start = time.perf_counter()
if kind == "numpy":
    store = CorpusStore(path)
    store.lengths("src")  # maps the files, sums the block offsets
    size = len(store)
    def gather(ids):
        return store.padded("src", ids, 0), store.padded("tgt", ids, 0)
else:
    ds = datasets.load_from_disk(path).with_format("numpy")
    size = len(ds)
    def gather(ids):
        rows = ds[ids]
        out = []
        for side in ("src", "tgt"):
            seqs = rows[side]
            width = max(len(s) for s in seqs)
            a = np.zeros((len(seqs), width), dtype=np.int64)
            for i, s in enumerate(seqs):
                a[i, : len(s)] = s
            out.append(a)
        return out
opened = time.perf_counter() - start
after_open = rss()
rng = np.random.default_rng(0)
batches = [np.sort(rng.choice(size, 128, replace=False)) for _ in range(n)]
start = time.perf_counter()
for ids in batches:
    gather(ids)
seconds = time.perf_counter() - start
print(json.dumps({"open_s": opened, "batches": n, "batch_ms": 1000 * seconds / n,
                  "rss_open_mib": after_open - base,
                  "rss_after_batches_mib": rss() - base}))
"""


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, **kw)
    if out.returncode:
        raise RuntimeError(f"{args[:3]} failed:\n{out.stderr[-3000:]}")
    return out


def write_corpus(source: Path, target: Path, times: int) -> None:
    """Multi30k's training set repeated ``times`` times, plus its val set."""
    target.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        data = gzip.decompress((source / f"train.{lang}.gz").read_bytes())
        with gzip.open(target / f"train.{lang}.gz", "wb", compresslevel=1) as f:
            for _ in range(times):
                f.write(data)
        shutil.copy(source / f"val.{lang}.gz", target / f"val.{lang}.gz")


def store_size(store: Path) -> tuple[int, int]:
    meta = json.loads((store / "meta.json").read_text())
    size = sum(f.stat().st_size for f in store.iterdir() if f.suffix != ".json")
    return size, meta["src_tokens"] + meta["tgt_tokens"]


def bench_size(times: int, work: Path, data_dir: Path, spm: Path, args) -> dict:
    corpus = work / f"x{times}"
    write_corpus(data_dir, corpus, times)
    run = corpus / "run"
    common = [
        f"data.dir={corpus}",
        f"data.tokenizer.model={spm}",
        f"training.run_dir={run}",
        f"training.threads={args.threads}",
    ]
    start = time.perf_counter()
    preprocess = [sys.executable, str(ROOT / "scripts" / "preprocess.py")]
    _run([*preprocess, "--config", str(CONFIG), *common])
    seconds = time.perf_counter() - start
    (store,) = (run / "cache").glob("store-train-*")
    size, tokens = store_size(store)
    pairs = 29000 * times
    train = _run(
        [
            sys.executable,
            "-c",
            TRAIN_RUN,
            str(ROOT),
            str(CONFIG),
            str(args.updates),
            *common,
            f"training.max_steps={args.updates}",
            "training.validate_every=100000",
            "training.valid_bleu=false",
            "training.best_metric=loss",
            "training.tensorboard=false",
            "training.resume=never",
            "training.overwrite=true",
            "training.save_every=0",
        ]
    )
    result = json.loads(train.stdout.strip().splitlines()[-1])
    opened = _run([sys.executable, "-c", VERIFY_RUN, str(ROOT), str(store)])
    result |= json.loads(opened.stdout.strip().splitlines()[-1])
    return {
        "size": f"{times}x",
        "pairs_read": pairs,
        "preprocess_s": seconds,
        "preprocess_pairs_per_s": pairs / seconds,
        "store_bytes": size,
        "store_tokens": tokens,
        "store_bytes_per_token": size / tokens,
        **result,
        "store": str(store),
    }


def arrow_copy(store: Path, target: Path) -> Path:
    """The store's pairs as a ``datasets`` Arrow dataset saved to disk."""
    import datasets
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from transformer.data import CorpusStore

    source = CorpusStore(store)

    def rows():
        for start in range(0, len(source), 10_000):
            ids = np.arange(start, min(start + 10_000, len(source)))
            lens = {side: source.lengths(side)[ids] for side in ("src", "tgt")}
            arrays = {side: source.padded(side, ids, 0) for side in ("src", "tgt")}
            for i in range(len(ids)):
                yield {
                    side: arrays[side][i, : lens[side][i]].astype(np.uint16)
                    for side in ("src", "tgt")
                }

    features = datasets.Features(
        {side: datasets.Sequence(datasets.Value("uint16")) for side in ("src", "tgt")}
    )
    ds = datasets.Dataset.from_generator(
        rows, features=features, cache_dir=str(target.parent / "hf-cache")
    )
    ds.save_to_disk(str(target))
    return target


def compare_formats(store: Path, work: Path, batches: int) -> dict:
    arrow = arrow_copy(store, work / "arrow")
    out = {}
    for kind, path in (("numpy", store), ("arrow", arrow)):
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        run = _run(
            [sys.executable, "-c", FORMAT_RUN, str(ROOT), kind, str(path), str(batches)]
        )
        out[kind] = {"bytes": size, **json.loads(run.stdout.strip().splitlines()[-1])}
    out["pairs"] = json.loads((store / "meta.json").read_text())["pairs"]
    return out


def bench_data(args) -> dict:
    data_dir = Path(args.data_dir)
    if not (data_dir / "train.de.gz").exists():
        raise SystemExit(f"Multi30k not found at {data_dir}")
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    load_before = os.getloadavg()  # a shared machine's load inflates the times
    try:
        spm_dir = work / "spm"
        _run(  # the tokenizer of the reference config, trained once on 1x
            [
                sys.executable,
                str(ROOT / "scripts" / "preprocess.py"),
                "--config",
                str(CONFIG),
                f"data.dir={data_dir}",
                f"training.run_dir={spm_dir}",
            ]
        )
        spm = spm_dir / "spm.model"
        sizes = [bench_size(t, work, data_dir, spm, args) for t in args.sizes]
        one, big = sizes[0], sizes[-1]
        from bench_common import machine

        result = {
            "benchmark": "data",
            "config": str(CONFIG.relative_to(ROOT)),
            "updates": args.updates,
            "threads": args.threads,
            "machine": {
                **machine(),
                "load_average_1min": [load_before[0], os.getloadavg()[0]],
            },
            "sizes": sizes,
            "peak_rss_ratio": big["peak_rss_mib"] / one["peak_rss_mib"],
            "first_update_ratio": big["first_update_s"] / one["first_update_s"],
        }
        if args.formats:
            store = Path(next(s["store"] for s in sizes if s["size"] == "10x"))
            result["formats_10x"] = compare_formats(store, work, args.format_batches)
        for s in sizes:
            s.pop("store")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="corpus store: size, start-up, memory")
    data.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/multi30k"))
    data.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    data.add_argument("--updates", type=int, default=5)
    data.add_argument("--threads", type=int, default=2)
    data.add_argument("--no-formats", dest="formats", action="store_false")
    data.add_argument("--format-batches", type=int, default=500)
