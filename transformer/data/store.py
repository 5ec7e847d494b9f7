"""The tokenized training corpus on disk, memory-mapped.

A store is written once per (corpus files, tokenizer, filter settings) and then
shared by every run, rank and DataLoader worker through the page cache. Per side it
holds two flat numpy files (the layout of fairseq's binarized data):

- ``src.bin`` / ``tgt.bin``: the token ids of every kept pair, back to back, as
  uint16 when the vocabulary has fewer than 65,536 pieces (uint32 otherwise);
- ``src.len`` / ``tgt.len``: one length per pair, uint8 when ``data.max_length``
  is below 256 (uint16 / uint32 otherwise).

Offsets are not stored: opening a store sums the lengths in blocks of 64 pairs and
keeps one offset per block, so memory stays flat (an offset per pair would cost 8
bytes a pair) and the store stays near 2 bytes a token. ``meta.json`` records the
counts, the filter statistics and what the store was built from; a store is built
in a temporary folder and renamed into place, so a half-written one is never used.

Why numpy files and not Hugging Face ``datasets`` (Arrow): both memory-map, but
Arrow keeps an int32 or int64 offset per row and a row-oriented read path, so its
store is larger and gathering a batch of rows is much slower than two numpy fancy
indexings; ``scripts/benchmark.py data`` measures both (start-up, RSS, batch
assembly) and ``benchmarks/data.json`` holds the numbers. ``datasets`` stays the
way hub corpora are read; they are streamed into this same store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from transformer.config import DataConfig
from transformer.data.arrays import block_offsets, gather
from transformer.data.corpus import FilterStats, keep_pair

# DIGESTS and file_digests stay importable from here, where they were defined
from transformer.data.identity import DIGESTS, corpus_identity, file_digests  # noqa: F401
from transformer.data.integrity import (
    ARRAYS,
    BUILD_LOCK,
    CHECKSUM_NAME,
    clean_partial_stores,
    new_checksum,
    set_aside,
    store_problems,
)
from transformer.data.readers import (
    DataError,
    read_pairs,
    split_origin,
)
from transformer.data.sides import (
    build_direction,
    direction_problems,
    open_direction,
    uses_sides,
)
from transformer.files import as_if_created
from transformer.locks import acquire
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STORE_VERSION = 1
CHUNK = 20_000  # pairs read, tokenized and written at a time (the raw-text buffer)


def _uint(limit: int) -> np.dtype:
    """The smallest unsigned dtype holding values below ``limit``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if limit <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _key(cfg: DataConfig, split: str, tokenizer: Tokenizer, identity: dict) -> str:
    settings: dict[str, Any] = {
        "version": STORE_VERSION,
        "split": split,
        "tokenizer": tokenizer.hash(),
        "max_length": cfg.max_length,
        "max_length_ratio": cfg.max_length_ratio,
        **identity,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def store_key(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    seed: int,
    cache_dir: str | Path | None = None,
) -> str:
    """Changes with the content of the corpus files (not their path or time), the
    tokenizer, the format and fields, and the filter settings: any of them builds
    a new store, and a checkpoint's data position refers to this key."""
    return _key(cfg, split, tokenizer, corpus_identity(cfg, split, seed, cache_dir))


def legacy_store_key(
    cfg: DataConfig, split: str, tokenizer: Tokenizer, seed: int
) -> str:
    """The key of stores built before keys followed content (files by path, size
    and modification time): a checkpoint written then names its corpus by it."""
    identity = corpus_identity(cfg, split, seed, by_content=False)
    return _key(cfg, split, tokenizer, identity)


class CorpusStore:
    """A built store, opened lazily (so that it pickles cheaply to workers).

    Args:
        path: the store's folder (holding ``meta.json``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text("utf-8"))
        self.pairs: int = self.meta["pairs"]
        self._maps: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.pairs

    @staticmethod
    def problems_of(path: Path, checksums: bool = True) -> list[str]:
        """What is wrong with the store in ``path`` (empty: it is whole)."""
        try:
            meta = json.loads((path / "meta.json").read_text("utf-8"))
        except (OSError, ValueError) as e:
            return [f"meta.json: {getattr(e, 'strerror', None) or e}"]
        if not isinstance(meta, dict):
            return ["meta.json: not a store's record"]
        if meta.get("layout") == "sides":
            return direction_problems(path, meta, checksums)
        return store_problems(path, meta, checksums)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # reopened where unpickled

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def filter_stats(self) -> FilterStats:
        return FilterStats(**self.meta["filter"])

    def _open(self) -> dict[str, Any]:
        if self._maps is None and self.meta.get("layout") == "sides":
            self._maps = open_direction(self.path, self.meta)
        if self._maps is None:
            maps: dict[str, Any] = {}
            for side in ("src", "tgt"):
                ids_dtype = np.dtype(self.meta["ids_dtype"])
                len_dtype = np.dtype(self.meta["len_dtype"])
                lengths = np.memmap(self.path / f"{side}.len", len_dtype, "r")
                tokens = self.meta[f"{side}_tokens"]
                ids = (
                    np.memmap(self.path / f"{side}.bin", ids_dtype, "r")
                    if tokens
                    else np.zeros(0, ids_dtype)
                )
                maps[side] = (ids, lengths, block_offsets(lengths))
            self._maps = maps
        return self._maps

    def lengths(self, side: str) -> np.ndarray:
        """Pieces per pair on ``side`` (no <bos>/<eos>), memory-mapped (read
        through the kept lines for a store over shared sides)."""
        maps = self._open()
        if "kept" in maps:
            return np.asarray(maps[side][1][maps["kept"]])
        return maps[side][1]

    def padded(self, side: str, indices: np.ndarray, pad: int) -> np.ndarray:
        """The pieces of pairs ``indices`` on ``side`` as (B, longest), ``pad`` after
        each sentence."""
        maps = self._open()
        ids, lengths, blocks = maps[side]
        rows = np.asarray(indices, dtype=np.int64)
        if "kept" in maps:  # a pair is a line of the shared sides
            rows = np.asarray(maps["kept"][rows], dtype=np.int64)
        return gather(ids, lengths, blocks, rows, pad)

    def pair(self, index: int) -> tuple[list[int], list[int]]:
        """The pieces of one pair (for tests and inspection)."""
        row = np.array([index])
        src, tgt = self.padded("src", row, -1)[0], self.padded("tgt", row, -1)[0]
        return src[src >= 0].tolist(), tgt[tgt >= 0].tolist()


def _chunks(pairs: Iterator[tuple[str, str]], size: int) -> Iterator[list]:
    chunk: list[tuple[str, str]] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Report:
    """Pairs read so far: a bar on a terminal, a log line every 30 s otherwise."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=f"preprocessing {name}", unit=" pairs")
        self.start = self.last = time.perf_counter()
        self.count = 0

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= 30:
            self.last = time.perf_counter()
            rate = self.count / (self.last - self.start)
            log.info("%s: %d pairs read (%.0f/s)", self.name, self.count, rate)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start


def build_store(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    directory: str | Path,
    seed: int = 0,
    threads: int = -1,
    progress: bool = True,
) -> CorpusStore:
    """Read ``split`` in a stream, tokenize (SentencePiece on ``threads``
    threads, -1 = all cores), filter and write a store in ``directory``.

    At most ``CHUNK`` raw pairs are held at a time. The filter counts are logged
    and kept in ``meta.json``; a corpus that is empty or filtered away entirely is
    a ``DataError`` naming its files and the filter.
    """
    directory = Path(directory)
    key = store_key(cfg, split, tokenizer, seed, directory.parent)
    vocab = max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    ids_dtype = np.dtype(np.uint16 if vocab <= 65536 else np.uint32)
    len_dtype = _uint(cfg.max_length + 1)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_partial_stores(directory.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    as_if_created(staging)
    try:
        building = acquire(staging / BUILD_LOCK)  # tells cleaners that it is alive
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stats = FilterStats()
    tokens = {"src": 0, "tgt": 0}
    sums = {name: new_checksum() for name in ARRAYS}
    report = _Report(split_origin(cfg, split), progress)
    try:
        with contextlib.ExitStack() as stack:
            files = {
                name: stack.enter_context(open(staging / name, "wb")) for name in ARRAYS
            }
            for chunk in _chunks(read_pairs(cfg, split, seed), CHUNK):
                texts = {"src": [s for s, _ in chunk], "tgt": [t for _, t in chunk]}
                src = tokenizer.src.encode(texts["src"], num_threads=threads)
                tgt = tokenizer.tgt.encode(texts["tgt"], num_threads=threads)
                kept: dict[str, list[list[int]]] = {"src": [], "tgt": []}
                for (s_text, t_text), s, t in zip(chunk, src, tgt, strict=True):
                    why = keep_pair(s_text, t_text, s, t, cfg)
                    if why is not None:
                        setattr(stats, why, getattr(stats, why) + 1)
                        continue
                    kept["src"].append(s)
                    kept["tgt"].append(t)
                stats.kept += len(kept["src"])
                for side, seqs in kept.items():
                    if not seqs:
                        continue
                    lengths = np.fromiter(map(len, seqs), len_dtype, len(seqs))
                    flat = np.fromiter(
                        (i for seq in seqs for i in seq), ids_dtype, int(lengths.sum())
                    )
                    for name, array in (
                        (f"{side}.bin", flat),
                        (f"{side}.len", lengths),
                    ):
                        files[name].write(array.data)
                        sums[name].update(array.data)
                    tokens[side] += len(flat)
                report.update(len(chunk))
        seconds = report.close()
        seen = stats.kept + stats.empty + stats.too_long + stats.bad_ratio
        if not seen:
            raise DataError(f"{split_origin(cfg, split)}: the {split!r} split is empty")
        if not stats.kept:
            raise stats.nothing_kept(cfg, split)
        meta = {
            "version": STORE_VERSION,
            "key": key,
            "source": split_origin(cfg, split),
            "pairs": stats.kept,
            "src_tokens": tokens["src"],
            "tgt_tokens": tokens["tgt"],
            "ids_dtype": ids_dtype.name,
            "len_dtype": len_dtype.name,
            "filter": asdict(stats),
            "tokenizer": tokenizer.hash(),
            "seconds": seconds,
            "checksums": {
                k: f"{CHECKSUM_NAME}:{v.hexdigest()}" for k, v in sums.items()
            },
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        building.release()
        (staging / BUILD_LOCK).unlink()
        try:
            os.rename(staging, directory)  # atomic; fails if another built it first
        except OSError:
            if not (directory / "meta.json").exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException as e:
        building.release()
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a write: name the store
            raise OSError(e.errno, e.strerror or str(e), str(directory)) from None
        raise
    stats.log(f"{split} ({meta['source']})")
    log.info(
        "corpus store %s: %d pairs, %d + %d tokens, %.1f s (%.0f pairs/s)",
        directory,
        stats.kept,
        tokens["src"],
        tokens["tgt"],
        seconds,
        seen / max(seconds, 1e-9),
    )
    return CorpusStore(directory)


def open_store(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
) -> CorpusStore:
    """The store for these settings: reused when built and whole (its sizes and
    checksums are checked), built when missing, rebuilt when damaged."""
    key = store_key(cfg, split, tokenizer, seed, cache_dir)
    path = Path(cache_dir) / f"store-{split}-{key}"
    build = build_store
    if uses_sides(cfg):  # a multilingual text corpus: each language's file once

        def build(cfg, split, tokenizer, path, seed, progress):
            clean_partial_stores(path.parent)
            build_direction(cfg, split, tokenizer, path, key, split_origin(cfg, split))
            return CorpusStore(path)

    if not path.exists():
        log.info("building the corpus store %s", path)
        return build(cfg, split, tokenizer, path, seed, progress=progress)
    problems = CorpusStore.problems_of(path)
    if not problems:
        store = CorpusStore(path)
        log.info("corpus store %s: %d pairs (reused)", path, len(store))
        return store
    log.warning(
        "corpus store %s is damaged (%s): rebuilding it", path, "; ".join(problems)
    )
    try:
        aside = set_aside(path)
        store = build(cfg, split, tokenizer, path, seed, progress=progress)
    except OSError as e:
        raise DataError(
            f"corpus store {path} is damaged ({'; '.join(problems)}) and cannot be "
            f"rebuilt: {e.filename or path}: {e.strerror or e}; delete it, or point "
            "data.cache_dir at a writable folder"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)
    return store
