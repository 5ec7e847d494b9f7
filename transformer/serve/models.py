"""The served models: loading checkpoints once, limits, and search settings."""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.checkpoint import CheckpointError, load_model, set_precision
from transformer.config import ConfigError, DecodingConfig
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
    """One checkpoint, loaded once, and the language pair it translates."""

    source: str
    target: str
    checkpoint: str
    model: nn.Module
    tokenizer: Tokenizer
    decoding: DecodingConfig  # the checkpoint's search settings: the defaults
    device: torch.device
    step: int | None = None

    @property
    def max_source(self) -> int:
        """Source pieces a sentence may have (one position is <eos>'s)."""
        return self.model.cfg.max_pieces()


def load_models(
    paths: list[str | Path],
    device: torch.device,
    precision: str | None = None,
    weights: str = "raw",
) -> list[LoadedModel]:
    """Load each checkpoint once; two checkpoints may not serve the same pair.

    ``precision`` (fp32 or bf16) defaults to each checkpoint's ``decoding.precision``;
    ``weights``: ``raw`` or ``ema`` (the moving average, ``training.ema_decay``).
    """
    models: dict[tuple[str, str], LoadedModel] = {}
    for path in paths:
        model, cfg, tokenizer, ckpt = load_model(path, device, weights)
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
    asked = options.get("alternatives", 0) + 1
    if asked > 1 and values["strategy"] != "beam":
        raise ConfigError("alternatives need beam search (beam_size > 1)")
    values["max_tokens"] = limits.batch_tokens
    settings = DecodingConfig(**values)
    # the rule of --nbest / --beam: a beam the request left open widens to hold the
    # hypotheses asked for; one it set and too small for them is an error
    names = ("alternatives + 1 = {} hypotheses", "beam_size={}")
    settings.settle_nbest(asked, options.get("beam_size"), names)
    if settings.strategy == "beam" and settings.beam_size > limits.max_beam:
        raise ConfigError(f"beam_size: at most {limits.max_beam} on this server")
    settings.validate(prefix="")
    return settings
