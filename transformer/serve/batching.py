"""Dynamic batching: one thread owns the models and decodes queued requests
that share a language pair and search settings as one batch under a token budget."""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from transformer.config import DecodingConfig
from transformer.controls import PieceControls
from transformer.inference import Translation
from transformer.serve.models import LoadedModel

log = logging.getLogger(__name__)


# --- dynamic batching ---


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts."""


@dataclass(eq=False)
class Job:
    """One request's work; jobs with equal keys may share a batch."""

    key: Hashable
    cost: int  # source tokens x beam it adds to a batch
    sentences: int
    payload: Any
    # runs on the decoding thread with a batch of jobs; one result per job
    run: Callable[[list["Job"]], list[Any]]
    future: asyncio.Future = field(repr=False)
    arrival: float = 0.0


class Batcher:
    """Queues jobs, groups those with one key into batches and runs the batches one
    at a time on a single decoding thread.

    A batch starts with the oldest waiting job, which waits for others of its key
    until ``max_wait`` seconds after it arrived or after the previous batch ended,
    whichever is later, or until their cost reaches ``batch_cost``. While a batch is
    being decoded new jobs queue up and join the next one, so batches grow with the
    load; the wait after a batch lets the clients it answered send again in time to
    join, so that clients which send as soon as they are answered do not split into
    two halves that take turns.
    """

    def __init__(self, batch_cost: int, max_wait: float, max_queue: int) -> None:
        self.batch_cost, self.max_wait, self.max_queue = batch_cost, max_wait, max_queue
        self.pending: list[Job] = []
        self.stats = {
            "requests": 0,
            "sentences": 0,
            "batches": 0,
            "largest_batch": 0,
            "timeouts": 0,
            "failures": 0,
        }
        self._arrived = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for job in self.pending:
            job.future.cancel()
        self.pending.clear()

    async def submit(
        self,
        key: Hashable,
        cost: int,
        sentences: int,
        payload: Any,
        run: Callable[[list[Job]], list[Any]],
        timeout: float,
    ) -> Any:
        """Queue a job and wait for its result; asyncio.TimeoutError after
        ``timeout`` seconds (the job is then dropped unless already decoding)."""
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"{len(self.pending)} requests are waiting")
        loop = asyncio.get_running_loop()
        job = Job(key, cost, sentences, payload, run, loop.create_future(), loop.time())
        self.pending.append(job)
        self._arrived.set()
        try:
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError:
            self.stats["timeouts"] += 1
            raise

    def _take(self, key: Hashable) -> list[Job]:
        """The oldest jobs of ``key`` that fit the budget (at least one)."""
        batch, cost, rest = [], 0, []
        for job in self.pending:
            if job.key == key and (not batch or cost + job.cost <= self.batch_cost):
                batch.append(job)
                cost += job.cost
            else:
                rest.append(job)
        self.pending = rest
        return batch

    def _cost(self, key: Hashable) -> int:
        return sum(job.cost for job in self.pending if job.key == key)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while True:
            self.pending = [job for job in self.pending if not job.future.done()]
            if not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self.pending[0]
            while self._cost(first.key) < self.batch_cost:
                start = max(first.arrival, idle_since)
                remaining = start + self.max_wait - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [job for job in self._take(first.key) if not job.future.done()]
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            size = sum(job.sentences for job in batch)
            self.stats["sentences"] += size
            self.stats["largest_batch"] = max(self.stats["largest_batch"], size)
            try:
                results = await loop.run_in_executor(self._executor, first.run, batch)
            except Exception as e:  # the worker lives on; these requests fail
                idle_since = loop.time()
                log.exception("decoding a batch of %d requests failed", len(batch))
                self.stats["failures"] += 1
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            idle_since = loop.time()
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():  # a timed-out job's result is dropped
                    job.future.set_result(result)


# --- work run on the decoding thread ---


@dataclass
class TranslationWork:
    model: LoadedModel
    settings: DecodingConfig
    sources: list[list[int]]  # pieces of the non-empty sentences, truncated
    # per sentence, its checked controls (None: none)
    controls: list[PieceControls | None] | None = None
    alignment: int | None = None  # the attention layer that aligns, if asked


def translate_batch(jobs: list[Job]) -> list[list[list[Translation]]]:
    """Decode the sentences of several requests together; per job and sentence, the
    n-best translations (aligned for the jobs that ask)."""
    work: TranslationWork = jobs[0].payload
    lm = work.model
    sources = [s for job in jobs for s in job.payload.sources]
    controls = None
    if any(job.payload.controls for job in jobs):
        controls = [
            c
            for job in jobs
            for c in (job.payload.controls or [None] * len(job.payload.sources))
        ]
    hyps = lm.translator.decode(sources, work.settings, lm.way, controls=controls)
    out, start = [], 0
    for job in jobs:
        end = start + len(job.payload.sources)
        mine = hyps[start:end]
        layer = job.payload.alignment
        if layer is not None:
            pairs = [(h, src) for h_list, src in zip(mine, job.payload.sources,
                     strict=True) for h in h_list]  # fmt: skip
            links = lm.translator.alignments(
                [src for _, src in pairs], [h.tokens for h, _ in pairs], lm.way, layer
            )
            for (h, _), text in zip(pairs, links, strict=True):
                h.alignment = text
        out.append(mine)
        start = end
    return out


@dataclass
class AttentionWork:
    model: LoadedModel
    settings: DecodingConfig
    sentence: str
    layer: int
    head: int | None


def attention_batch(jobs: list[Job]) -> list[bytes]:
    """Render each job's cross-attention heat map (never batched: one job)."""
    from transformer.plots import attention_png

    out = []
    for job in jobs:
        work: AttentionWork = job.payload
        lm = work.model
        out.append(
            attention_png(
                lm.model,
                lm.tokenizer,
                work.sentence,
                work.settings,
                lm.device,
                work.layer,
                work.head,
                lm.way,
            )
        )
    return out
