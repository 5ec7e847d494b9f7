"""The web application: LibreTranslate-style JSON API, the page, errors."""

# No ``from __future__ import annotations`` here: FastAPI reads the request models of
# the endpoints, which are defined inside ``create_app``, from runtime annotations.

import asyncio
import dataclasses
import itertools
import logging

from transformer.config import ConfigError
from transformer.controls import ControlError, Controls
from transformer.inference import unmet_warning
from transformer.serve.batching import (
    AttentionWork,
    Batcher,
    QueueFull,
    TranslationWork,
    attention_batch,
    translate_batch,
)
from transformer.serve.models import (
    EXTRA_MISSING,
    PAGE,
    LoadedModel,
    ServeConfig,
    search_settings,
)

log = logging.getLogger(__name__)


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
        unk_penalty: float | None = Field(
            None, description="subtracted from <unk>'s log-probability"
        )
        timeout: float | None = Field(
            None, gt=0, le=limits.timeout_s, description="seconds; 504 after that"
        )

    class Sentence(BaseModel):
        """One sentence with its controls (``transformer-translate --jsonl``'s
        line)."""

        model_config = ConfigDict(extra="forbid")
        src: str = Field(description="the sentence")
        prefix: str | None = Field(
            None, description="the output starts with it (a trailing space ends "
            "its last word)"
        )  # fmt: skip
        constraints: list[str] = Field(
            [], description="phrases the output must contain (beam search)"
        )
        forbid: list[str] = Field([], description="phrases the output must not contain")

    class TranslateRequest(SearchOptions):
        """LibreTranslate's request, plus the search options, per-sentence
        controls and alignments."""

        q: str | Sentence | list[str | Sentence] = Field(
            description="a sentence or a list; each a string, or an object with "
            "src and its controls"
        )
        alternatives: int = Field(
            0, ge=0, le=limits.max_alternatives, description="n-best beyond the best"
        )
        alignment: bool = Field(
            False, description="word alignments (Pharaoh i-j) from the attention"
        )
        alignment_layer: int = Field(
            -1, description="the decoder layer whose attention aligns"
        )
        format: Literal["text"] = "text"
        api_key: str | None = Field(None, description="accepted and ignored")

    class TranslateResponse(BaseModel):
        translatedText: str | list[str]
        alternatives: list[str] | list[list[str]]
        alignment: str | list[str] | None = Field(
            None, description="per sentence, Pharaoh word alignments (if asked)"
        )
        warnings: list[str] = Field(
            description="e.g. truncated sentences, constraints not met"
        )

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

    def check_text(sentences: list[str]) -> None:
        for number, sentence in enumerate(sentences, start=1):
            try:  # JSON's \ud800 escapes decode to lone surrogates, not text
                sentence.encode("utf-8")
            except UnicodeEncodeError as e:
                code = ord(sentence[e.start])
                raise ApiError(
                    400, f"sentence {number}: not Unicode text (lone \\u{code:04x})"
                ) from None

    def model_for(req: SearchOptions) -> LoadedModel:
        """The model of the asked direction; a multilingual model that knows both
        languages serves a pair it was not trained on (zero-shot)."""
        lm = by_pair.get((req.source, req.target))
        if lm is not None:
            return lm
        for candidate in models:
            known = candidate.translator.config.data.languages()
            if candidate.way is not None and {req.source, req.target} <= set(known):
                try:
                    return candidate.other(req.source, req.target)
                except ConfigError as e:
                    raise ApiError(400, str(e)) from None
        pairs = ", ".join(f"{s}->{t}" for s, t in by_pair)
        raise ApiError(
            400,
            f"no model translates {req.source}->{req.target}; this server has {pairs}",
        )

    def settings_for(lm: LoadedModel, req: SearchOptions, alternatives: int):
        options = req.model_dump(include=set(SearchOptions.model_fields))
        try:
            return search_settings(
                lm.decoding, {**options, "alternatives": alternatives}, limits
            )
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

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
        response_model_exclude_none=True,  # alignment only when asked for
        summary="translate a sentence or a list of sentences",
    )
    async def translate(request: Request, req: TranslateRequest):
        lm = model_for(req)
        settings = settings_for(lm, req, req.alternatives)
        if req.alignment:
            try:
                lm.translator.check_alignment(req.alignment_layer, "alignment_layer")
            except ConfigError as e:
                raise ApiError(400, str(e)) from None
        single = not isinstance(req.q, list)
        items = [req.q] if single else list(req.q)
        sentences = [i if isinstance(i, str) else i.src for i in items]
        controls: list[Controls | None] = []
        for number, item in enumerate(items, start=1):
            if isinstance(item, str):
                controls.append(None)
                continue
            try:
                c = Controls.from_dict(item.model_dump(), ignore=("src",))
            except ControlError as e:  # pydantic checked the types: not reached
                raise ApiError(400, f"sentence {number}: {e}") from None
            controls.append(None if c.empty else c)
        if not any(s.strip() for s in sentences):
            raise ApiError(400, "q is empty: give a sentence or a list of sentences")
        check_text(sentences)
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
        if lm.way is not None and lm.way.zero_shot:
            warnings.append(
                f"{lm.source}->{lm.target} is zero-shot: the model was not trained "
                "on it (expect weaker output, sometimes in another language)"
            )
        prefix = lm.way.prefix if lm.way is not None else ()
        for i, ids in zip(todo, pieces, strict=True):
            if len(ids) > lm.max_source:
                warnings.append(
                    f"sentence {i + 1}: {len(ids)} pieces, more than the model's "
                    f"{lm.max_source}; only the first {lm.max_source} were translated"
                )
                ids = ids[: lm.max_source]
            sources.append([*prefix, *ids])
        mine = [controls[i] for i in todo]
        pieces = None
        if any(c is not None for c in mine):
            pieces, errors = lm.translator.encode_controls(sources, mine, settings)
            for i, error in zip(todo, errors, strict=True):
                if error is not None:
                    raise ApiError(400, f"sentence {i + 1}: {error}")
        beam = settings.beam_size if settings.strategy == "beam" else 1
        cost = sum(len(s) + 1 for s in sources) * beam
        key = ("translate", lm.source, lm.target, dataclasses.astuple(settings))
        if settings.strategy == "sample":
            # alone, so that a seed gives the same sample whatever else is queued
            key += (next(unique),)
        layer = req.alignment_layer if req.alignment else None
        work = TranslationWork(lm, settings, sources, pieces, layer)
        done = await run(request, req, key, cost, len(sources), work, translate_batch)
        results: list[list[str]] = [[""] for _ in sentences]
        aligned: list[str] = ["" for _ in sentences]
        for i, nbest in zip(todo, done, strict=True):
            results[i] = [h.text for h in nbest] or [""]
            if nbest:
                aligned[i] = nbest[0].alignment or ""
                warning = unmet_warning(controls[i], nbest[0].unmet)
                if warning:
                    warnings.append(f"sentence {i + 1}: {warning}")
        best = [r[0] for r in results]
        others = [r[1:] for r in results]
        alignment = aligned if req.alignment else None
        if single:
            return {
                "translatedText": best[0],
                "alternatives": others[0],
                "alignment": alignment[0] if alignment else None,
                "warnings": warnings,
            }
        return {
            "translatedText": best,
            "alternatives": others,
            "alignment": alignment,
            "warnings": warnings,
        }

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
        check_text([req.q])
        if len(req.q) > limits.max_chars:
            raise ApiError(
                413, f"{len(req.q):,} characters; at most {limits.max_chars:,}"
            )
        layers = len(lm.model.decoder)
        if not -layers <= req.layer < layers:
            raise ApiError(400, f"layer: must be in [{-layers}, {layers - 1}]")
        heads = getattr(lm.model.cfg, "n_heads", 1)  # an RNN's attention: one
        if req.head is not None and req.head >= heads:
            raise ApiError(400, f"head: must be in [0, {heads - 1}]")
        work = AttentionWork(lm, settings, req.q, req.layer, req.head)
        key = ("attention", next(unique))
        png = await run(request, req, key, 1, 1, work, attention_batch)
        return Response(png, media_type="image/png")

    return app
