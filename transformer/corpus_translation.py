"""Translating a whole corpus, the step every distillation and back-translation
pipeline repeats: in chunks that are written as they finish and resumed after an
interruption, by one process or several.

The input is cut into chunks of ``chunk_lines`` lines. A finished chunk's
translations are written (atomically) to ``<output>.parts/<k>.txt``; a rerun
skips the chunks whose file exists, so an interrupted job loses at most the
chunks it was translating. ``job.json`` in the same folder records what the parts
were made with (the input's content, the checkpoints' sizes and digests, the
search settings, the direction, the chunk size): a rerun with anything else is
refused rather than mixed in. When every chunk is done the parts are joined into
``output`` (atomically) and the folder is removed. Every chunk is translated the
same way whether the job ran straight through or was resumed, so the output is
the same line for line.

Output: one line a line of input (an empty line gives an empty line); with
``nbest`` > 1, ``line<TAB>score<TAB>text`` rows numbered from 0, as
``transformer-translate`` writes them.

Several workers: each is a process that loads the model(s) once and uses its share
of the CPU threads; chunks are handed out in order, and a failing worker ends the
job with its error (the finished chunks stay).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from transformer.config import ConfigError, DecodingConfig
from transformer.data import read_lines
from transformer.files import atomic_write, atomic_write_bytes, sha256_of

log = logging.getLogger(__name__)

_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029", " "))


@dataclass
class CorpusJob:
    """What a corpus translation is: the models, the search, the direction, the
    chunking. Everything here goes into ``job.json``."""

    checkpoints: list[str]
    decoding: DecodingConfig
    weights: str = "raw"
    src_lang: str | None = None
    tgt_lang: str | None = None
    chunk_lines: int = 2000
    workers: int = 1
    threads: int = 0  # CPU threads in all; 0: every core
    extra: dict[str, Any] = field(default_factory=dict)


def _record(job: CorpusJob, source: Path) -> dict[str, Any]:
    """What the parts are made with (``job.json``)."""
    return {
        "input": {"file": str(source), "sha256": sha256_of(source)},
        "checkpoints": [
            {"file": c, "bytes": Path(c).stat().st_size, "sha256": sha256_of(c)}
            for c in job.checkpoints
        ],
        "weights": job.weights,
        "decoding": asdict(job.decoding),
        "direction": [job.src_lang, job.tgt_lang],
        "chunk_lines": job.chunk_lines,
    }


def _chunks(lines: list[str], size: int) -> Iterator[tuple[int, list[str]]]:
    for k, start in enumerate(range(0, len(lines), size)):
        yield k, lines[start : start + size]


def _format(chunk_start: int, lines: list[str], results, nbest: int) -> str:
    out = []
    done = dict(results)
    for i in range(len(lines)):
        hyps = done.get(i)
        if nbest > 1:
            for h in hyps or [None]:
                score, text = (h.score, h.text) if h else (0.0, "")
                text = text.translate(_LINE_BREAKS)
                out.append(f"{chunk_start + i}\t{score:.4f}\t{text}")
        else:
            out.append(hyps[0].text.translate(_LINE_BREAKS) if hyps else "")
    return "".join(f"{row}\n" for row in out)


# --- the worker side (a process of its own, or this one) ---

_worker: dict[str, Any] = {}


def _load(job: CorpusJob, threads: int) -> None:
    from transformer.inference import Translator

    if os.environ.get("TRANSFORMER_TEST_FAIL_LOAD"):  # a test's fault injection
        raise SystemExit(1)
    if threads:
        torch.set_num_threads(threads)
    translator = Translator.load(job.checkpoints, "cpu", job.weights)
    translator.cast(job.decoding.precision)
    way = translator.direction(job.src_lang, job.tgt_lang)
    _worker.update(translator=translator, way=way, job=job)


class ChunkError(RuntimeError):
    """A chunk could not be translated; the message names it and why."""


def _translate_chunk(item: tuple[int, int, list[str], Path]) -> int:
    """Translate one chunk and write its part; returns the chunk's number."""
    k, start, lines, part = item
    try:
        return _translate(k, start, lines, part)
    except Exception as e:  # one line, whatever the process it ran in
        raise ChunkError(
            f"chunk {k} (lines {start + 1}-{start + len(lines)}): "
            f"{type(e).__name__}: {e}"
        ) from None


def _translate(k: int, start: int, lines: list[str], part: Path) -> int:
    fail = os.environ.get("TRANSFORMER_TEST_FAIL_CHUNK")
    if fail is not None and int(fail) == k:  # a test's fault injection
        raise RuntimeError("injected failure")
    translator, way, job = _worker["translator"], _worker["way"], _worker["job"]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    done = translator.translate([lines[i] for i in todo], job.decoding, way=way)
    text = _format(start, lines, zip(todo, done, strict=True), job.decoding.nbest)
    atomic_write_bytes(part, text.encode("utf-8"))
    return k


# --- the job ---


def translate_corpus(
    job: CorpusJob, source: str | Path, output: str | Path, progress: bool = True
) -> Path:
    """Translate every line of ``source`` into ``output`` (see the module
    docstring); resumes from ``<output>.parts`` when an earlier run was cut."""
    source, output = Path(source), Path(output)
    if job.chunk_lines < 1 or job.workers < 1:
        raise ConfigError("--chunk-lines and --workers: must be >= 1")
    if not source.is_file():
        raise ConfigError(f"--input {source}: no such file")
    parts = output.with_name(output.name + ".parts")
    record = _record(job, source)
    manifest = parts / "job.json"
    if manifest.exists():
        try:
            earlier = json.loads(manifest.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{manifest}: unreadable ({e}); delete {parts}") from None
        if earlier != record:
            changed = [k for k in record if earlier.get(k) != record[k]]
            raise ConfigError(
                f"{parts} holds parts of another translation (it differs in "
                f"{', '.join(changed)}): delete it, or rerun with its settings"
            )
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(manifest, (json.dumps(record, indent=1) + "\n").encode())
    lines = list(read_lines(source))
    todo = [
        (k, k * job.chunk_lines, chunk, parts / f"{k:06d}.txt")
        for k, chunk in _chunks(lines, job.chunk_lines)
        if not (parts / f"{k:06d}.txt").exists()
    ]
    total = -(-len(lines) // job.chunk_lines)
    if len(todo) < total:
        log.info("%s: %d of %d chunks done earlier", parts, total - len(todo), total)
    _run(job, todo, sum(len(c) for _, _, c, _ in todo), progress)

    def join(joined) -> None:
        for k in range(total):
            with open(parts / f"{k:06d}.txt", "rb") as part:
                shutil.copyfileobj(part, joined)

    atomic_write(output, join)
    shutil.rmtree(parts)
    return output


def _run(job: CorpusJob, todo: list, lines: int, progress: bool) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    cores = job.threads or torch.get_num_threads()
    share = max(cores // job.workers, 1)
    bar = tqdm(total=lines, unit=" lines", desc="translating", disable=not progress)
    try:
        if job.workers == 1:
            _load(job, share)
            for item in todo:
                _translate_chunk(item)
                bar.update(len(item[2]))
            return
        # a process pool that breaks (raises) when a worker dies, where
        # multiprocessing.Pool would start another one for ever
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            job.workers, mp_context=context, initializer=_load, initargs=(job, share)
        )
        try:
            futures = {pool.submit(_translate_chunk, item): item for item in todo}
            for future in as_completed(futures):
                future.result()
                bar.update(len(futures[future][2]))
        except BaseException as e:
            _stop(pool)  # no worker outlives the job
            if type(e).__name__ == "BrokenProcessPool":
                raise ChunkError(
                    f"a worker process died ({e}); a script that runs the command "
                    "on import must guard it with if __name__ == '__main__'"
                ) from None
            raise
        pool.shutdown()
    finally:
        bar.close()
        _worker.clear()


def _stop(pool) -> None:
    """Cancel what is queued and end the workers at once (the executor itself
    only waits for them)."""
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.join(timeout=10)
