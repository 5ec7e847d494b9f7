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
import re
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
from transformer.data.corpus import FilterStats, keep_pair
from transformer.data.readers import (
    DataError,
    hub_local_files,
    read_pairs,
    split_files,
    split_origin,
)
from transformer.files import as_if_created, atomic_write_bytes
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STORE_VERSION = 1
BLOCK = 64  # pairs per stored-at-open offset
CHUNK = 20_000  # pairs read, tokenized and written at a time (the raw-text buffer)


def _uint(limit: int) -> np.dtype:
    """The smallest unsigned dtype holding values below ``limit``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if limit <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


DIGESTS = "file-digests.json"  # in the cache folder: path, size, mtime -> sha256


def _stamp(info: os.stat_result) -> list[int]:
    """What identifies a file's version without reading it: size, modification
    and change times, inode. The change time cannot be set back by ``cp -p``,
    ``rsync -t`` or ``tar``, so rewritten content is never taken for the old."""
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_digests(files: list[Path], cache_dir: str | Path | None = None) -> list[str]:
    """The sha256 of each file's bytes.

    A corpus is known by its content, not by where it lies or when it was last
    touched: a copy, a move or a fresh checkout of the same files keeps the key of
    its store, so a run resumes and the store is reused. Hashing reads each file
    once; the digests are remembered in ``cache_dir`` under the file's path and
    stamp (size, times, inode) and recomputed when any of those changes.
    """
    table: dict[str, Any] = {}
    index = Path(cache_dir) / DIGESTS if cache_dir is not None else None
    if index is not None and index.exists():
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(index.read_text("utf-8"))
            table = loaded if isinstance(loaded, dict) else {}
    digests, changed = [], False
    for path in files:
        info = path.stat()
        name, stamp = str(path.resolve()), _stamp(info)
        entry = table.get(name)
        if (
            isinstance(entry, list)
            and len(entry) == len(stamp) + 1
            and entry[:-1] == stamp
            and isinstance(entry[-1], str)
            and re.fullmatch(r"[0-9a-f]{64}", entry[-1])
        ):
            digests.append(entry[-1])
            continue
        start = time.perf_counter()
        digest = _sha256(path)
        seconds = time.perf_counter() - start
        if seconds > 2:
            log.info("hashed %s (%.0f MB) in %.1f s", path, info.st_size / 1e6, seconds)
        if _stamp(path.stat()) == stamp:  # not remembered if it changed meanwhile
            table[name] = [*stamp, digest]
            changed = True
        digests.append(digest)
    if changed and index is not None:
        try:  # concurrent writers: the last one wins whole
            atomic_write_bytes(
                index, json.dumps(table, indent=1, sort_keys=True).encode()
            )
        except OSError as e:
            log.warning(
                "cannot remember corpus digests in %s (%s): the corpus files are "
                "hashed again at every start",
                index,
                e.strerror or e,
            )
    return digests


def corpus_identity(
    cfg: DataConfig,
    split: str,
    seed: int,
    cache_dir: str | Path | None = None,
    by_content: bool = True,
) -> dict[str, Any]:
    """What a split's raw pairs are: the format and fields, and the content of
    its files (or a hub corpus's name, or a toy task's settings); with
    ``by_content=False`` the files' path, size and time, as keys were before."""
    identity: dict[str, Any] = {
        "format": cfg.format,
        "langs": [cfg.src_lang, cfg.tgt_lang],
        "fields": [cfg.src_field, cfg.tgt_field],
    }
    if cfg.synthetic:
        identity["toy"] = [cfg.toy_vocab, cfg.toy_min_len, cfg.toy_max_len]
        identity["toy"] += [cfg.toy_train_size, seed]
    elif cfg.format == "hub" and not cfg.dir:  # a hub corpus: its name
        identity["hub"] = [cfg.hub_name, cfg.hub_config, cfg.dir]
    else:
        if cfg.format == "hub":  # a generic builder over local files: those too
            identity["hub"] = [cfg.hub_name, cfg.hub_config]
            files = hub_local_files(cfg, split)
        else:
            files = split_files(cfg, split)
        if by_content:
            identity["files"] = file_digests(files, cache_dir)
        else:
            if cfg.format == "hub":
                identity["hub"].append(cfg.dir)
            identity["files"] = [
                [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                for p in files
            ]
    return identity


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

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # reopened where unpickled

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def filter_stats(self) -> FilterStats:
        return FilterStats(**self.meta["filter"])

    def _open(self) -> dict[str, Any]:
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
                sums = np.add.reduceat(
                    lengths, np.arange(0, len(lengths), BLOCK), dtype=np.int64
                )
                blocks = np.concatenate([[0], np.cumsum(sums)])  # (pairs / 64 + 1,)
                maps[side] = (ids, lengths, blocks)
            self._maps = maps
        return self._maps

    def lengths(self, side: str) -> np.ndarray:
        """Pieces per pair on ``side`` (no <bos>/<eos>), memory-mapped."""
        return self._open()[side][1]

    def padded(self, side: str, indices: np.ndarray, pad: int) -> np.ndarray:
        """The pieces of pairs ``indices`` on ``side`` as (B, longest), ``pad`` after
        each sentence."""
        ids, lengths, blocks = self._open()[side]
        indices = np.asarray(indices, dtype=np.int64)
        lens = lengths[indices].astype(np.int64)  # (B,)
        # offset = the block's offset + the lengths before it inside the block
        first = indices - indices % BLOCK
        window = first[:, None] + np.arange(BLOCK - 1)  # (B, 63)
        before = window < indices[:, None]
        inner = np.where(before, lengths[np.minimum(window, self.pairs - 1)], 0)
        offsets = blocks[indices // BLOCK] + inner.sum(1, dtype=np.int64)
        width = int(lens.max()) if len(lens) else 0
        cols = np.arange(width)
        real = cols[None, :] < lens[:, None]  # (B, W)
        out = np.full((len(indices), width), pad, dtype=np.int64)
        out[real] = ids[(offsets[:, None] + cols[None, :])[real]]
        return out

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
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    as_if_created(staging)
    stats = FilterStats()
    tokens = {"src": 0, "tgt": 0}
    report = _Report(split_origin(cfg, split), progress)
    try:
        with contextlib.ExitStack() as stack:
            files = {
                name: stack.enter_context(open(staging / name, "wb"))
                for name in ("src.bin", "tgt.bin", "src.len", "tgt.len")
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
                    files[f"{side}.bin"].write(flat.tobytes())
                    files[f"{side}.len"].write(lengths.tobytes())
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
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(staging, directory)  # atomic; fails if another built it first
        except OSError:
            if not (directory / "meta.json").exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
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
    """The store for these settings: reused when built, built when missing."""
    key = store_key(cfg, split, tokenizer, seed, cache_dir)
    path = Path(cache_dir) / f"store-{split}-{key}"
    if (path / "meta.json").exists():
        store = CorpusStore(path)
        log.info("corpus store %s: %d pairs (reused)", path, len(store))
        return store
    log.info("building the corpus store %s", path)
    return build_store(cfg, split, tokenizer, path, seed, progress=progress)
