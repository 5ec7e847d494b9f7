"""Translation server: a LibreTranslate-style JSON API, dynamic batching, a web page.

    transformer-serve --checkpoint checkpoints/multi30k_de_en/best.pt --port 8080

Each checkpoint serves the language pair of its config (``data.src_lang`` ->
``data.tgt_lang``). Requests that arrive within ``max_wait_ms`` of each other and ask
for the same pair and search are decoded as one batch, under a token budget, by one
background thread that owns the models, so the event loop is never blocked.

FastAPI and uvicorn are the ``serve`` extra (``pip install -e ".[serve]"``); they are
imported inside the functions that need them, so ``import transformer`` never does.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the request models of
# the endpoints, which are defined inside ``create_app``, from runtime annotations.

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import sys
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import CheckpointError, load_model, set_precision
from transformer.config import ConfigError, DecodingConfig
from transformer.model import Transformer
from transformer.search import decode_corpus
from transformer.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
EXTRA_MISSING = (
    "transformer-serve needs FastAPI and uvicorn: pip install -e '.[serve]' "
    "(or pip install 'fastapi>=0.110' 'uvicorn>=0.29')"
)


@dataclass
class ServeConfig:
    """Request limits, batching and timeouts of the server."""

    max_sentences: int = 64  # sentences in one request
    max_chars: int = 20_000  # characters in one request, all sentences together
    max_body_bytes: int = 1_000_000  # request body, by its Content-Length
    max_alternatives: int = 4  # n-best beyond the best
    max_beam: int = 16
    batch_tokens: int = 4096  # source tokens x beam decoded together
    max_wait_ms: float = 5.0  # how long a batch's first request waits for others
    timeout_s: float = 60.0  # default and upper bound of a request's timeout
    max_queue: int = 1024  # requests waiting; beyond that the server answers 503

    def validate(self) -> None:
        for name in (
            "max_sentences",
            "max_chars",
            "max_body_bytes",
            "max_beam",
            "batch_tokens",
            "max_queue",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}: must be at least 1")
        if self.max_alternatives < 0 or self.max_wait_ms < 0:
            raise ConfigError("serve.max_alternatives, max_wait_ms: must be >= 0")
        if self.timeout_s <= 0:
            raise ConfigError("serve.timeout_s: must be positive")


# --- models ---


@dataclass
class LoadedModel:
    """One checkpoint, loaded once, and the language pair it translates."""

    source: str
    target: str
    checkpoint: str
    model: Transformer
    tokenizer: Tokenizer
    decoding: DecodingConfig  # the checkpoint's search settings: the defaults
    device: torch.device
    step: int | None = None

    @property
    def max_source(self) -> int:
        """Source pieces a sentence may have (one position is <eos>'s)."""
        return self.model.cfg.max_positions - 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available")
    return device


def load_models(
    paths: list[str | Path], device: torch.device, precision: str | None = None
) -> list[LoadedModel]:
    """Load each checkpoint once; two checkpoints may not serve the same pair.

    ``precision`` (fp32 or bf16) defaults to each checkpoint's ``decoding.precision``.
    """
    models: dict[tuple[str, str], LoadedModel] = {}
    for path in paths:
        model, cfg, tokenizer, ckpt = load_model(path, device)
        set_precision(model, precision or cfg.decoding.precision)
        pair = (cfg.data.src_lang, cfg.data.tgt_lang)
        if pair in models:
            raise CheckpointError(
                f"{path} and {models[pair].checkpoint} both translate "
                f"{pair[0]}->{pair[1]}; serve one model per language pair"
            )
        models[pair] = LoadedModel(
            *pair, str(path), model, tokenizer, cfg.decoding, device, ckpt.get("step")
        )
        log.info("%s: %s->%s", path, *pair)
    return list(models.values())


def search_settings(
    base: DecodingConfig, options: dict[str, Any], limits: ServeConfig
) -> DecodingConfig:
    """The checkpoint's search settings with a request's options applied.

    ``options`` holds ``greedy``, ``sample``, ``beam_size``, ``length_penalty``,
    ``temperature``, ``top_k``, ``top_p``, ``seed`` (None: keep the checkpoint's) and
    ``alternatives`` (hypotheses beyond the best). Raises ConfigError naming the
    option that does not fit.
    """
    values = dataclasses.asdict(base)
    if options.get("greedy") and options.get("sample"):
        raise ConfigError("greedy and sample exclude each other")
    if options.get("sample"):
        values["strategy"] = "sample"
    elif options.get("greedy"):
        values["strategy"] = "greedy"
    elif options.get("beam_size") is not None:
        values["strategy"] = "beam" if options["beam_size"] > 1 else "greedy"
    for key in ("beam_size", "length_penalty", "temperature", "top_k", "top_p", "seed"):
        if options.get(key) is not None:
            values[key] = options[key]
    values["nbest"] = options.get("alternatives", 0) + 1
    if values["nbest"] > 1:
        if values["strategy"] != "beam":
            raise ConfigError("alternatives need beam search (beam_size > 1)")
        values["beam_size"] = max(values["beam_size"], values["nbest"])
    if values["strategy"] == "beam" and values["beam_size"] > limits.max_beam:
        raise ConfigError(f"beam_size: at most {limits.max_beam} on this server")
    values["max_tokens"] = limits.batch_tokens
    settings = DecodingConfig(**values)
    settings.validate(prefix="")
    return settings


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


def translate_batch(jobs: list[Job]) -> list[list[list[str]]]:
    """Decode the sentences of several requests together; per job and sentence, the
    n-best detokenized translations."""
    work: TranslationWork = jobs[0].payload
    lm = work.model
    sources = [s for job in jobs for s in job.payload.sources]
    hyps = decode_corpus(lm.model, sources, work.settings, lm.device)
    texts = [[lm.tokenizer.decode_tgt(h.tokens) for h in nbest] for nbest in hyps]
    out, start = [], 0
    for job in jobs:
        end = start + len(job.payload.sources)
        out.append(texts[start:end])
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
            )
        )
    return out


# --- the web application ---


class ApiError(Exception):
    """An answer with a 4xx/5xx status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _validation_message(errors: list[dict], content_type: str) -> str:
    """One line from pydantic's errors about a request body."""
    if not content_type.startswith("application/json"):
        return "invalid request: send a JSON object with Content-Type: application/json"
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        detail = (error.get("ctx") or {}).get("error")
        if error.get("type") == "json_invalid":  # loc holds the character offset
            parts.append(f"not valid JSON at character {loc[0]} ({detail})")
            continue
        message = error.get("msg", "invalid")
        if detail and str(detail) not in message:
            message += f" ({detail})"
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "invalid request: " + "; ".join(parts)


def create_app(models: list[LoadedModel], limits: ServeConfig | None = None):
    """The FastAPI application serving ``models`` within ``limits``."""
    try:
        from contextlib import asynccontextmanager
        from typing import Literal

        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from pydantic import BaseModel, ConfigDict, Field
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise ImportError(EXTRA_MISSING) from e

    limits = limits or ServeConfig()
    limits.validate()
    if not models:
        raise ConfigError("no models to serve")
    by_pair = {(m.source, m.target): m for m in models}
    page = PAGE.read_text(encoding="utf-8")
    unique = itertools.count()  # keys of jobs that must not share a batch

    class SearchOptions(BaseModel):
        """Language pair and search; unset options keep the checkpoint's."""

        model_config = ConfigDict(extra="forbid")
        source: str = Field(description="source language code, e.g. de")
        target: str = Field(description="target language code, e.g. en")
        beam_size: int | None = Field(None, ge=1, le=limits.max_beam)
        length_penalty: float | None = Field(None, ge=0, description="GNMT alpha")
        greedy: bool = False
        sample: bool = Field(False, description="sample instead of searching")
        temperature: float | None = Field(None, gt=0)
        top_k: int | None = Field(None, ge=0, description="sample from the k best")
        top_p: float | None = Field(None, gt=0, le=1, description="nucleus mass")
        seed: int | None = Field(None, description="sampling seed")
        timeout: float | None = Field(
            None, gt=0, le=limits.timeout_s, description="seconds; 504 after that"
        )

    class TranslateRequest(SearchOptions):
        """LibreTranslate's request, plus the search options."""

        q: str | list[str] = Field(description="a sentence or a list of sentences")
        alternatives: int = Field(
            0, ge=0, le=limits.max_alternatives, description="n-best beyond the best"
        )
        format: Literal["text"] = "text"
        api_key: str | None = Field(None, description="accepted and ignored")

    class TranslateResponse(BaseModel):
        translatedText: str | list[str]
        alternatives: list[str] | list[list[str]]
        warnings: list[str] = Field(description="e.g. truncated sentences")

    class AttentionRequest(SearchOptions):
        q: str = Field(description="one sentence")
        layer: int = Field(-1, description="decoder layer; negative counts back")
        head: int | None = Field(None, ge=0, description="None: mean over heads")

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(
            limits.batch_tokens, limits.max_wait_ms / 1000, limits.max_queue
        )
        batcher.start()
        app.state.batcher = batcher
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="transformer-nmt",
        description="Neural machine translation with batched decoding.",
        version="0.1.0",
        lifespan=lifespan,
    )

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        return error(400, _validation_message(list(exc.errors()), content_type))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            return error(
                413, f"request body over {limits.max_body_bytes:,} bytes ({length})"
            )
        return await call_next(request)

    def model_for(req: SearchOptions) -> LoadedModel:
        lm = by_pair.get((req.source, req.target))
        if lm is None:
            pairs = ", ".join(f"{s}->{t}" for s, t in by_pair)
            raise ApiError(
                400,
                f"no model translates {req.source}->{req.target}; "
                f"this server has {pairs}",
            )
        return lm

    def settings_for(lm: LoadedModel, req: SearchOptions, alternatives: int):
        options = req.model_dump(include=set(SearchOptions.model_fields))
        try:
            return search_settings(
                lm.decoding, {**options, "alternatives": alternatives}, limits
            )
        except ConfigError as e:
            raise ApiError(400, str(e).removeprefix(".")) from None

    async def run(request: Request, req: SearchOptions, key, cost, n, work, fn):
        batcher: Batcher = request.app.state.batcher
        timeout = req.timeout or limits.timeout_s
        try:
            return await batcher.submit(key, cost, n, work, fn, timeout)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; try again later") from None
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                f"translation did not finish within {timeout:g} s; send fewer or "
                "shorter sentences, or a longer timeout",
            ) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/languages", summary="language pairs served")
    async def languages():
        sources: dict[str, list[str]] = {}
        for s, t in by_pair:
            sources.setdefault(s, []).append(t)
        return [
            {"code": s, "name": s, "targets": sorted(ts)}
            for s, ts in sorted(sources.items())
        ]

    @app.get("/health", summary="liveness, models and batching statistics")
    async def health(request: Request):
        batcher: Batcher = request.app.state.batcher
        body = {
            "status": "ok" if batcher.alive else "decoding worker stopped",
            "models": [
                {
                    "source": m.source,
                    "target": m.target,
                    "checkpoint": m.checkpoint,
                    "step": m.step,
                    "max_source_pieces": m.max_source,
                }
                for m in models
            ],
            "queued": len(batcher.pending),
            **batcher.stats,
        }
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.post(
        "/translate",
        response_model=TranslateResponse,
        summary="translate a sentence or a list of sentences",
    )
    async def translate(request: Request, req: TranslateRequest):
        lm = model_for(req)
        settings = settings_for(lm, req, req.alternatives)
        sentences = [req.q] if isinstance(req.q, str) else list(req.q)
        if not any(s.strip() for s in sentences):
            raise ApiError(400, "q is empty: give a sentence or a list of sentences")
        if len(sentences) > limits.max_sentences:
            raise ApiError(
                413,
                f"{len(sentences)} sentences in one request; at most "
                f"{limits.max_sentences}",
            )
        chars = sum(len(s) for s in sentences)
        if chars > limits.max_chars:
            raise ApiError(
                413,
                f"{chars:,} characters in one request; at most {limits.max_chars:,}",
            )
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        pieces = lm.tokenizer.encode_src([sentences[i] for i in todo])
        sources, warnings = [], []
        for i, ids in zip(todo, pieces, strict=True):
            if len(ids) > lm.max_source:
                warnings.append(
                    f"sentence {i + 1}: {len(ids)} pieces, more than the model's "
                    f"{lm.max_source}; only the first {lm.max_source} were translated"
                )
                ids = ids[: lm.max_source]
            sources.append(ids)
        beam = settings.beam_size if settings.strategy == "beam" else 1
        cost = sum(len(s) + 1 for s in sources) * beam
        key = ("translate", lm.source, lm.target, dataclasses.astuple(settings))
        if settings.strategy == "sample":
            # alone, so that a seed gives the same sample whatever else is queued
            key += (next(unique),)
        work = TranslationWork(lm, settings, sources)
        done = await run(request, req, key, cost, len(sources), work, translate_batch)
        results: list[list[str]] = [[""] for _ in sentences]
        for i, nbest in zip(todo, done, strict=True):
            results[i] = nbest or [""]
        best = [r[0] for r in results]
        others = [r[1:] for r in results]
        if isinstance(req.q, str):
            return {
                "translatedText": best[0],
                "alternatives": others[0],
                "warnings": warnings,
            }
        return {"translatedText": best, "alternatives": others, "warnings": warnings}

    @app.post(
        "/attention",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
        summary="cross-attention heat map (PNG) of one sentence's translation",
    )
    async def attention(request: Request, req: AttentionRequest):
        lm = model_for(req)
        settings = settings_for(lm, req, 0)
        if not req.q.strip():
            raise ApiError(400, "q is empty: give a sentence")
        if len(req.q) > limits.max_chars:
            raise ApiError(
                413, f"{len(req.q):,} characters; at most {limits.max_chars:,}"
            )
        layers = len(lm.model.decoder)
        if not -layers <= req.layer < layers:
            raise ApiError(400, f"layer: must be in [{-layers}, {layers - 1}]")
        if req.head is not None and req.head >= lm.model.cfg.n_heads:
            raise ApiError(400, f"head: must be in [0, {lm.model.cfg.n_heads - 1}]")
        work = AttentionWork(lm, settings, req.q, req.layer, req.head)
        key = ("attention", next(unique))
        png = await run(request, req, key, 1, 1, work, attention_batch)
        return Response(png, media_type="image/png")

    return app


# --- command line ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(
        prog="transformer-serve",
        description="Serve checkpoints over HTTP: JSON API, web page at /, "
        "API docs at /docs.",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a .pt checkpoint; repeat for more language pairs",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="default 8080")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0: all")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="weights and activations (default: the checkpoint's decoding.precision)",
    )
    for f in dataclasses.fields(ServeConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"default {getattr(defaults, f.name)}",
        )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        import uvicorn
    except ImportError:
        print(f"error: {EXTRA_MISSING}", file=sys.stderr)
        return 2
    limits = ServeConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    )
    try:
        limits.validate()
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        models = load_models(args.checkpoint, device, args.precision)
        app = create_app(models, limits)
    except (ConfigError, CheckpointError, TokenizerError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
