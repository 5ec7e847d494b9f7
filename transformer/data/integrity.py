"""A corpus store checks itself: the sizes of its arrays against ``meta.json``,
and a checksum of each array written at build time; and the partial stores of
interrupted builds are cleaned up.

A store cut short (a disk error, an interrupted copy, a full disk) would
otherwise be trusted: a data worker would index past its end mid-run. The
checksum is xxHash's XXH3-128 (``xxhash``, already a dependency of ``datasets``):
it reads at memory speed, so checking a store costs about what reading it from
the page cache does (``scripts/benchmark.py data`` measures it: ``open_verify_s``).
It guards against damage, not against an adversary.

Stores written before checksums are checked by size only: that catches the
damage seen in practice (a file cut short), and rebuilding every such store
would cost a full tokenization pass on the first start after an upgrade.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from transformer.locks import is_held

log = logging.getLogger(__name__)

ARRAYS = ("src.bin", "tgt.bin", "src.len", "tgt.len")
BUILD_LOCK = "build.lock"  # held in a staging folder while its build runs
STALE_SECONDS = 3600  # a staging folder without a lock, untouched this long: dead
_BLOCK = 1 << 22


def new_checksum() -> Any:
    """A running checksum (``update(bytes)``, ``hexdigest()``)."""
    import xxhash

    return xxhash.xxh3_128()


CHECKSUM_NAME = "xxh3_128"


def file_checksum(path: Path) -> str:
    """The checksum of a file's bytes, read in blocks into one buffer."""
    digest = new_checksum()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def expected_sizes(meta: dict[str, Any]) -> dict[str, int]:
    """The byte size of each array that ``meta.json``'s counts imply."""
    ids = np.dtype(meta["ids_dtype"]).itemsize
    lens = np.dtype(meta["len_dtype"]).itemsize
    return {
        "src.bin": meta["src_tokens"] * ids,
        "tgt.bin": meta["tgt_tokens"] * ids,
        "src.len": meta["pairs"] * lens,
        "tgt.len": meta["pairs"] * lens,
    }


def store_problems(path: Path, meta: dict[str, Any], checksums: bool) -> list[str]:
    """What is wrong with the store in ``path`` (empty: nothing found): missing
    arrays, sizes that differ from ``meta.json``'s counts, and with ``checksums``
    arrays whose bytes differ from those written (stores that recorded none are
    checked by size only)."""
    try:
        sizes = expected_sizes(meta)
    except (KeyError, TypeError, ValueError) as e:
        return [f"meta.json: incomplete ({type(e).__name__}: {e})"]
    problems = []
    for name, size in sizes.items():
        try:
            actual = (path / name).stat().st_size
        except OSError as e:
            problems.append(f"{name}: {e.strerror or e}")
            continue
        if actual != size:
            problems.append(
                f"{name}: {actual:,} bytes where meta.json's counts make {size:,}"
            )
    recorded = meta.get("checksums")
    if problems or not checksums or not isinstance(recorded, dict):
        return problems
    for name in ARRAYS:
        kind, _, value = str(recorded.get(name, "")).partition(":")
        if kind != CHECKSUM_NAME:
            problems.append(f"{name}: no {CHECKSUM_NAME} checksum in meta.json")
        elif file_checksum(path / name) != value:
            problems.append(f"{name}: its bytes differ from those written")
    return problems


def _newest_change(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    times += [p.stat().st_mtime for p in folder.iterdir()]
    return max(times)


def clean_partial_stores(cache_dir: Path) -> None:
    """Delete what interrupted builds left in ``cache_dir`` (hidden ``.store-*``
    folders): a staging folder whose build lock nobody holds, or, without a lock
    file (an older version's build, a folder set aside), one untouched for an
    hour. A live build's folder is never touched."""
    try:
        leftovers = [p for p in cache_dir.glob(".store-*") if p.is_dir()]
    except OSError:
        return
    for folder in leftovers:
        try:
            lock = folder / BUILD_LOCK
            if lock.exists():
                if is_held(lock):
                    continue
            elif time.time() - _newest_change(folder) < STALE_SECONDS:
                continue
            shutil.rmtree(folder)
        except OSError as e:  # gone meanwhile, or not ours to delete
            log.debug("cannot clean up %s: %s", folder, e)
            continue
        log.warning("removed %s, left by an interrupted corpus store build", folder)


def set_aside(path: Path) -> Path:
    """Move a damaged store out of the way (renamed in its folder, which is
    atomic) so that a new one can take its name; returns where it went."""
    import tempfile

    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.damaged.", dir=path.parent))
    os.rename(path, aside / "store")
    return aside
