"""What a training corpus is, for the key of its store: its format and fields,
and the content of its files (sha256, remembered by path, size and times), a hub
corpus's name, or a toy task's settings."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from transformer.config import DataConfig
from transformer.data.readers import hub_local_files, split_files
from transformer.files import atomic_write_bytes, sha256_of

log = logging.getLogger(__name__)


DIGESTS = "file-digests.json"  # in the cache folder: path, size, mtime -> sha256


def _stamp(info: os.stat_result) -> list[int]:
    """What identifies a file's version without reading it: size, modification
    and change times, inode. The change time cannot be set back by ``cp -p``,
    ``rsync -t`` or ``tar``, so rewritten content is never taken for the old."""
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


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
        digest = sha256_of(path)
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
    if cfg.toy:
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
