"""Downloading a published corpus on first use: resumable, verified, atomic.

When ``data.dir`` does not exist and the config names ``data.source_url`` with the
expected ``data.source_files`` (name: sha256), the files are fetched into a cache
folder (``data.download_dir``, default ``~/.cache/transformer_nmt/corpora/<url
hash>``), which the log names, and ``data.dir`` points there. A file is written as
``NAME.part`` (an interrupted download resumes from where it stopped, with an HTTP
Range request), checked against its sha256 and only then renamed into place; a file
that fails its check is deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from transformer.config import DataConfig
from transformer.data.readers import DataError
from transformer.files import sha256_of

log = logging.getLogger(__name__)

ATTEMPTS = 3  # tries per file; each resumes the previous one's partial file
TIMEOUT = 60  # seconds without an answer before a try fails
# a try also fails when fewer than STALL_BYTES arrive in STALL_SECONDS: a server
# that drips a byte now and then never trips the timeout above
STALL_SECONDS = 60.0
STALL_BYTES = 16 * 1024


def default_download_dir(url: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(base) / "transformer_nmt" / "corpora" / digest


def _fetch_once(url: str, part: Path) -> None:
    """Append what is missing of ``url`` to ``part`` (all of it if the server
    ignores the Range request)."""
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url)
    if done:
        request.add_header("Range", f"bytes={done}-")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        if done and response.status != 206:  # no resume: start over
            done = 0
        total = response.headers.get("Content-Length")
        total = int(total) + done if total is not None else None
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                total=total, initial=done, unit="B", unit_scale=True, desc=part.stem
            )
        try:
            # unbuffered: a full disk fails a write, not the close
            with _local(open, part, "ab" if done else "wb", 0) as f:
                since, arrived = time.monotonic(), 0
                # read1: what has arrived, without waiting for a whole block
                for block in iter(lambda: response.read1(1 << 16), b""):
                    _local(f.write, block)
                    if bar is not None:
                        bar.update(len(block))
                    arrived += len(block)
                    if time.monotonic() - since >= STALL_SECONDS:
                        if arrived < STALL_BYTES:
                            raise OSError(
                                f"stalled: {arrived} bytes in the last "
                                f"{STALL_SECONDS:g} s"
                            )
                        since, arrived = time.monotonic(), 0
        finally:
            if bar is not None:
                bar.close()
        if total is not None and part.stat().st_size != total:
            raise OSError(f"{url}: got {part.stat().st_size} of {total} bytes")


class _WriteFailed(Exception):
    """Writing the download failed here (a full or read-only disk): not retried."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))


def _local(call, *args):
    """``call(*args)``, an operation on the local file: its OSError is not the
    network's, and retrying would not help."""
    try:
        return call(*args)
    except OSError as e:
        raise _WriteFailed(e) from None


def download(url: str, target: Path, sha256: str) -> Path:
    """``url`` to ``target``, verified against ``sha256``; resumes and retries."""
    if target.exists() and sha256_of(target) == sha256:
        return target
    part = target.with_name(target.name + ".part")
    error: Exception | None = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _fetch_once(url, part)
            break
        except urllib.error.HTTPError as e:
            part.unlink(missing_ok=True)
            raise DataError(
                f"cannot download {url}: HTTP {e.code} {e.reason} (check "
                "data.source_url, or point data.dir at a local copy)"
            ) from e
        except _WriteFailed as e:
            part.unlink(missing_ok=True)
            raise DataError(
                f"cannot write {part}: {e}; the download was deleted (free space "
                "there, or set data.download_dir)"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            error = e  # cut off: the next try resumes
            log.warning("%s: try %d of %d failed (%s)", url, attempt, ATTEMPTS, e)
    else:
        kept = (
            f"; {part} holds what arrived, the next run resumes"
            if part.exists()
            else ""
        )
        raise DataError(
            f"cannot download {url} ({error}){kept}. Without a network, point "
            "data.dir at a local copy (data.dir=PATH)"
        )
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise DataError(
            f"{url}: sha256 {got} does not match the expected {sha256}; the "
            "download was deleted"
        )
    os.replace(part, target)
    return target


def ensure_corpus(cfg: DataConfig) -> DataConfig:
    """The data settings whose ``dir`` holds the corpus: ``cfg`` itself when its
    folder exists (or it needs none), else a copy naming the folder the files were
    downloaded into. A missing folder without a source is an error naming both
    remedies."""
    if cfg.toy or (cfg.format == "hub" and not cfg.dir):
        return cfg
    if cfg.dir and Path(cfg.dir).is_dir():
        return cfg
    if not (cfg.source_url and cfg.source_files):
        raise DataError(
            f"data directory not found: {cfg.dir}; pass data.dir=PATH, or give "
            "data.source_url and data.source_files to download the corpus"
        )
    folder = Path(cfg.download_dir or default_download_dir(cfg.source_url))
    folder.mkdir(parents=True, exist_ok=True)
    missing = [
        name
        for name, digest in cfg.source_files.items()
        if not (folder / name).exists()
    ]
    if missing:
        log.info(
            "data directory %s not found: downloading %d file(s) from %s into %s",
            cfg.dir,
            len(missing),
            cfg.source_url,
            folder,
        )
    for name, digest in cfg.source_files.items():
        download(f"{cfg.source_url.rstrip('/')}/{name}", folder / name, digest)
    log.info("corpus: %s", folder)
    return dataclasses.replace(cfg, dir=str(folder))
