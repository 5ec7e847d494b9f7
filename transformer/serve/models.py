"""The served models: loading checkpoints once, limits, and search settings."""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.checkpoint import CheckpointError
from transformer.config import ConfigError, DecodingConfig
from transformer.data.languages import Direction
from transformer.inference import Translator
from transformer.tokenizer import Tokenizer

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
    max_beam: int = 16  # largest beam_size a request may ask for
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
    """One direction a loaded checkpoint serves; the directions of a
    multilingual checkpoint share its ``translator`` (one model in memory)."""

    source: str
    target: str
    checkpoint: str
    translator: Translator
    step: int | None = None
    way: Direction | None = None  # its tags (None: a bilingual model's own)

    @property
    def model(self) -> nn.Module:
        return self.translator.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.translator.tokenizer

    @property
    def device(self) -> torch.device:
        return self.translator.device

    @property
    def decoding(self) -> DecodingConfig:
        """The checkpoint's search settings: the defaults of every request."""
        return self.translator.config.decoding

    @property
    def max_source(self) -> int:
        """Source pieces a sentence may have (one position is <eos>'s)."""
        return self.translator.max_source(self.way)

    def other(self, source: str, target: str) -> "LoadedModel":
        """The same model in another direction (a multilingual one's zero-shot
        pair); ConfigError when it cannot translate it."""
        way = self.translator.direction(source, target)
        return LoadedModel(
            source, target, self.checkpoint, self.translator, self.step, way
        )


def load_models(
    paths: list[str | Path],
    device: torch.device,
    precision: str | None = None,
    weights: str = "raw",
) -> list[LoadedModel]:
    """Load each checkpoint once; one entry per direction it was trained on (a
    multilingual checkpoint has several); two checkpoints may not serve the same
    direction.

    ``precision`` (fp32 or bf16) defaults to each checkpoint's ``decoding.precision``;
    ``weights``: ``raw`` or ``ema`` (the moving average, ``training.ema_decay``).
    """
    models: dict[tuple[str, str], LoadedModel] = {}
    for path in paths:
        translator = Translator.load([path], device, weights)
        translator.cast(precision or translator.config.decoding.precision)
        step = translator.infos[0].get("step")
        for pair in translator.directions:
            if pair in models:
                raise CheckpointError(
                    f"{path} and {models[pair].checkpoint} both translate "
                    f"{pair[0]}->{pair[1]}; serve one model per language pair"
                )
            way = translator.direction(*pair) if translator.multilingual else None
            models[pair] = LoadedModel(*pair, str(path), translator, step, way)
        log.info(
            "%s: %s",
            path,
            ", ".join(f"{s}->{t}" for s, t in translator.directions),
        )
    return list(models.values())


# how a request spells the search options in the errors of ``with_options``
# (the rest as ``name=value``)
SPELLING = {"sample": "sample: true", "nbest": "alternatives + 1 = {} hypotheses"}
# what a request may not set: the server decides these itself
SERVER_SET = {"strategy", "nbest", "max_tokens", "precision", "compile"}


def search_settings(
    base: DecodingConfig, options: dict[str, Any], limits: ServeConfig
) -> DecodingConfig:
    """The checkpoint's search settings with a request's options applied.

    ``options`` holds ``greedy``, ``sample``, ``alternatives`` (hypotheses beyond
    the best) and search settings under their ``DecodingConfig`` names
    (``beam_size``, ``length_penalty``, ``temperature``, ...; None: keep the
    checkpoint's); other keys are ignored. Raises ConfigError naming the option
    that does not fit.
    """
    if options.get("greedy") and options.get("sample"):
        raise ConfigError("greedy and sample exclude each other")
    fields = {f.name for f in dataclasses.fields(DecodingConfig)} - SERVER_SET
    wanted = {key: value for key, value in options.items() if key in fields}
    if options.get("sample"):
        wanted["strategy"] = "sample"
    elif options.get("greedy"):
        wanted["strategy"] = "greedy"
    asked = options.get("alternatives", 0) + 1
    beam = wanted.get("beam_size")
    strategy = wanted.get("strategy") or (
        base.strategy if beam is None else ("beam" if beam > 1 else "greedy")
    )
    if asked > 1 and strategy != "beam":
        raise ConfigError("alternatives need beam search (beam_size > 1)")
    wanted |= {"nbest": asked, "max_tokens": limits.batch_tokens}
    settings = base.with_options(wanted, SPELLING, prefix="")
    if settings.strategy == "beam" and settings.beam_size > limits.max_beam:
        raise ConfigError(f"beam_size: at most {limits.max_beam} on this server")
    return settings
