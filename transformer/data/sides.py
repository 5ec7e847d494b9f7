"""The stores of a multilingual run: each language's file of a corpus tokenized
once, shared by every direction that reads it.

With ``data.pairs`` a text corpus is read in several directions, and a language
takes part in several of them (``train.en`` is the target of de->en, fr->en and
cs->en and the source of the other three). Tokenizing it once per direction would
repeat the work and the disk space: instead

- a *side* (``side-<split>-<lang>-<key>/``) holds one file's pieces, every line
  (``ids.bin``, ``ids.len``, in the layout of the pair stores), keyed by the
  file's content and the tokenizer;
- a direction's store (``store-<split>-<key>/``, the key a pair store of the same
  data would have) holds only ``kept.bin``: the lines its filters keep
  (``data.max_length``, ``data.max_length_ratio``, empty lines), which the two
  sides are read through.

A ``CorpusStore`` opens either layout; batches, checksums (``meta.json`` of each
folder), rebuilding after damage and the data position work as for pair stores.
Corpora in other formats (one file holds both languages) are stored per
direction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from transformer.config import DataConfig
from transformer.data.arrays import block_offsets
from transformer.data.corpus import FilterStats
from transformer.data.identity import file_digests
from transformer.data.integrity import CHECKSUM_NAME, file_checksum, new_checksum
from transformer.data.readers import DataError, read_lines, split_files
from transformer.files import as_if_created
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SIDE_VERSION = 1
SIDE_ARRAYS = ("ids.bin", "ids.len")
CHUNK = 20_000  # lines tokenized and written at a time


def uses_sides(cfg: DataConfig) -> bool:
    """Are these direction settings stored as two shared sides?"""
    return cfg.multilingual and cfg.format == "text"


def _side_key(path: Path, tokenizer: Tokenizer, cache_dir: Path) -> str:
    (digest,) = file_digests([path], cache_dir)
    settings = {"version": SIDE_VERSION, "file": digest, "tokenizer": tokenizer.hash()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[
        :20
    ]


def side_problems(path: Path, checksums: bool = True) -> list[str]:
    """What is wrong with the side in ``path`` (empty: it is whole)."""
    try:
        meta = json.loads((path / "meta.json").read_text("utf-8"))
        sizes = {
            "ids.bin": meta["tokens"] * np.dtype(meta["ids_dtype"]).itemsize,
            "ids.len": meta["lines"] * np.dtype(meta["len_dtype"]).itemsize,
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path.name}/meta.json: {getattr(e, 'strerror', None) or e}"]
    return _array_problems(path, sizes, meta, checksums)


def _array_problems(
    path: Path, sizes: dict[str, int], meta: dict[str, Any], checksums: bool
) -> list[str]:
    problems = []
    for name, size in sizes.items():
        try:
            actual = (path / name).stat().st_size
        except OSError as e:
            problems.append(f"{path.name}/{name}: {e.strerror or e}")
            continue
        if actual != size:
            problems.append(
                f"{path.name}/{name}: {actual:,} bytes where meta.json's counts "
                f"make {size:,}"
            )
    if problems or not checksums:
        return problems
    for name in sizes:
        kind, _, value = str(meta.get("checksums", {}).get(name, "")).partition(":")
        if kind != CHECKSUM_NAME or file_checksum(path / name) != value:
            problems.append(f"{path.name}/{name}: its bytes differ from those written")
    return problems


def _write_side(
    source: Path, tokenizer: Tokenizer, index: int, directory: Path
) -> dict[str, Any]:
    """Tokenize ``source`` (one sentence a line) into ``directory``; its meta."""
    vocab = max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    ids_dtype = np.dtype(np.uint16 if vocab <= 65536 else np.uint32)
    len_dtype = np.dtype(np.uint32)  # every line, unfiltered: no bound on length
    model = tokenizer.src if index == 0 else tokenizer.tgt
    sums = {name: new_checksum() for name in SIDE_ARRAYS}
    lines = tokens = 0
    with contextlib.ExitStack() as stack:
        files = {n: stack.enter_context(open(directory / n, "wb")) for n in sums}
        chunk: list[str] = []

        def flush() -> None:
            nonlocal lines, tokens
            seqs = model.encode(chunk, num_threads=-1)
            lengths = np.fromiter(map(len, seqs), len_dtype, len(seqs))
            flat = np.fromiter(
                (i for s in seqs for i in s), ids_dtype, int(lengths.sum())
            )
            for name, array in (("ids.bin", flat), ("ids.len", lengths)):
                files[name].write(array.data)
                sums[name].update(array.data)
            lines, tokens = lines + len(seqs), tokens + len(flat)
            chunk.clear()

        for line in read_lines(source):
            chunk.append(line)
            if len(chunk) >= CHUNK:
                flush()
        if chunk:
            flush()
    return {
        "version": SIDE_VERSION,
        "source": str(source),
        "lines": lines,
        "tokens": tokens,
        "ids_dtype": ids_dtype.name,
        "len_dtype": len_dtype.name,
        "tokenizer": tokenizer.hash(),
        "checksums": {k: f"{CHECKSUM_NAME}:{v.hexdigest()}" for k, v in sums.items()},
    }


def _publish(staging: Path, directory: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` and rename ``staging`` into place (atomic; a store
    another process built first wins)."""
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.rename(staging, directory)
    except OSError:
        if not (directory / "meta.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def _staging(directory: Path) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    as_if_created(staging)
    return staging


def open_side(
    cfg: DataConfig, split: str, index: int, tokenizer: Tokenizer, cache_dir: Path
) -> Path:
    """The side folder of ``cfg``'s source (``index`` 0) or target (1) file of
    ``split``: reused when whole, built when missing or damaged."""
    source = split_files(cfg, split)[index]
    lang = (cfg.src_lang, cfg.tgt_lang)[index]
    key = _side_key(source, tokenizer, cache_dir)
    path = cache_dir / f"side-{split}-{lang}-{key}"
    if path.exists():
        problems = side_problems(path)
        if not problems:
            return path
        log.warning("%s is damaged (%s): rebuilding it", path, "; ".join(problems))
        shutil.rmtree(path)
    staging = _staging(path)
    try:
        meta = _write_side(source, tokenizer, index, staging)
        _publish(staging, path, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("tokenized %s once for every direction: %s", source, path)
    return path


def kept_lines(
    src_len: np.ndarray, tgt_len: np.ndarray, cfg: DataConfig, stats: FilterStats
) -> np.ndarray:
    """The lines ``keep_pair``'s filters keep, from the two sides' piece counts
    (an empty line has no pieces); the counts of each filter go into ``stats``."""
    s, t = src_len.astype(np.int64), tgt_len.astype(np.int64)
    empty = (s == 0) | (t == 0)
    too_long = ~empty & ((s > cfg.max_length) | (t > cfg.max_length))
    bad_ratio = (
        ~empty
        & ~too_long
        & (np.maximum(s, t) > cfg.max_length_ratio * np.minimum(s, t))
    )
    keep = ~(empty | too_long | bad_ratio)
    stats.empty += int(empty.sum())
    stats.too_long += int(too_long.sum())
    stats.bad_ratio += int(bad_ratio.sum())
    stats.kept += int(keep.sum())
    return np.flatnonzero(keep)


def build_direction(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    directory: Path,
    key: str,
    origin: str,
) -> dict[str, Any]:
    """Write the store of one direction in ``directory`` over its two sides
    (built when missing); returns its ``meta.json``."""
    cache = directory.parent
    sides = [open_side(cfg, split, i, tokenizer, cache) for i in (0, 1)]
    metas = [json.loads((p / "meta.json").read_text("utf-8")) for p in sides]
    lengths = [
        np.fromfile(p / "ids.len", dtype=np.dtype(m["len_dtype"]))
        for p, m in zip(sides, metas, strict=True)
    ]
    if len(lengths[0]) != len(lengths[1]):
        raise DataError(
            f"{origin}: {len(lengths[0])} source lines but {len(lengths[1])} target "
            "lines: the two files are not aligned"
        )
    stats = FilterStats()
    kept = kept_lines(*lengths, cfg, stats)
    if not len(lengths[0]):
        raise DataError(f"{origin}: the {split!r} split is empty")
    if not stats.kept:
        raise stats.nothing_kept(cfg, split)
    kept = kept.astype(np.uint32 if len(lengths[0]) < 2**32 else np.uint64)
    staging = _staging(directory)
    try:
        kept.tofile(staging / "kept.bin")
        meta = {
            "version": SIDE_VERSION,
            "layout": "sides",
            "key": key,
            "source": origin,
            "pairs": int(len(kept)),
            "sides": [p.name for p in sides],
            "kept_dtype": kept.dtype.name,
            "src_tokens": int(lengths[0][kept].sum()),
            "tgt_tokens": int(lengths[1][kept].sum()),
            "filter": asdict(stats),
            "tokenizer": tokenizer.hash(),
            "checksums": {
                "kept.bin": f"{CHECKSUM_NAME}:{file_checksum(staging / 'kept.bin')}"
            },
        }
        _publish(staging, directory, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stats.log(f"{split} ({origin})")
    return meta


def direction_problems(path: Path, meta: dict[str, Any], checksums: bool) -> list[str]:
    """What is wrong with a direction's store and its two sides."""
    try:
        size = meta["pairs"] * np.dtype(meta["kept_dtype"]).itemsize
        sides = [path.parent / name for name in meta["sides"]]
    except (KeyError, TypeError, ValueError) as e:
        return [f"meta.json: incomplete ({type(e).__name__}: {e})"]
    problems = _array_problems(path, {"kept.bin": size}, meta, checksums)
    for side in sides:
        problems += side_problems(side, checksums)
    return problems


def open_direction(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The memory maps of a direction's store: per side (ids, lengths of every
    line, per-block offsets), and the kept lines."""
    kept = np.memmap(path / "kept.bin", np.dtype(meta["kept_dtype"]), "r")
    maps: dict[str, Any] = {"kept": kept}
    for side, name in zip(("src", "tgt"), meta["sides"], strict=True):
        folder = path.parent / name
        smeta = json.loads((folder / "meta.json").read_text("utf-8"))
        lengths = np.memmap(folder / "ids.len", np.dtype(smeta["len_dtype"]), "r")
        ids = (
            np.memmap(folder / "ids.bin", np.dtype(smeta["ids_dtype"]), "r")
            if smeta["tokens"]
            else np.zeros(0, np.dtype(smeta["ids_dtype"]))
        )
        maps[side] = (ids, lengths, block_offsets(lengths))
    return maps
