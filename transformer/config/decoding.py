"""The ``decoding`` section: search settings shared by validation, evaluation and
translation, and how a request for several hypotheses fits the search."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from transformer.config.base import ConfigError, check
from transformer.config.coerce import build_dataclass

# the options of sampling alone
SAMPLING = ("temperature", "top_k", "top_p", "seed")


@dataclass
class DecodingConfig:
    """Search settings shared by validation, evaluation and translation."""

    strategy: Literal["greedy", "beam", "sample"] = "beam"  # the search
    beam_size: int = 5  # hypotheses kept per sentence (beam search)
    length_penalty: float = 0.6  # GNMT alpha; 0 = raw log-probability
    nbest: int = 1  # hypotheses returned per sentence (beam search)
    max_len_a: float = 1.5  # max output length = a * source length + b
    max_len_b: int = 10  # see max_len_a
    min_len: int = 0  # pieces before <eos> is allowed
    # subtracted from <unk>'s log-probability at every step (fairseq's --unkpen):
    # > 0 gives fewer <unk>, < 0 more; it counts in the scores
    unk_penalty: float = 0.0
    temperature: float = 1.0  # sampling: logits divided by it
    top_k: int = 0  # sampling: only the k likeliest pieces; 0 = off
    top_p: float = 1.0  # sampling: smallest set with this mass (nucleus); 1.0 = off
    max_tokens: int = 8192  # source tokens per decoding batch
    seed: int = 0  # for sampling
    # weights and activations of transformer-eval / -translate; bf16 pays where
    # the CPU or GPU has native bf16, int8 (CPU only: the linear layers quantized)
    # where it has VNNI (docs: Benchmarks); scores stay float32
    precision: Literal["fp32", "bf16", "int8"] = "fp32"
    # torch.compile the cached decoding step (dynamic shapes, a few graphs per
    # model); on CPU compiling costs more than it saves (docs: Benchmarks)
    compile: bool = False

    def with_options(
        self,
        options: Mapping[str, Any],
        spelling: Mapping[str, str] | None = None,
        prefix: str = "decoding",
    ) -> DecodingConfig:
        """A copy with a user's search options applied, by the rules every front
        end (command line, server, exported model) shares.

        Args:
            options: field name -> value; None (or absent) keeps this config's
                value. Left without ``strategy``, a ``beam_size`` of 1 means
                greedy search and more means beam search.
            spelling: how the front end writes an option in its errors, a format
                with ``{}`` for the value (``{"beam_size": "--beam {}"}``), and
                under ``"sample"`` how to ask for sampling; default
                ``prefix.name={}`` (``name={}`` without a prefix).
            prefix: the section name that type and range errors carry.

        Rules: the sampling options (temperature, top_k, top_p, seed) need
        sampling; beam search widens its beam to hold ``nbest`` hypotheses
        unless ``beam_size`` was given too and is smaller; greedy search and
        sampling give one hypothesis, and asking them for more is an error.

        Raises:
            ConfigError: naming the option as the front end spells it.
        """
        spelling = dict(spelling or {})
        section = f"{prefix}." if prefix else ""

        def spell(name: str, value: Any = None) -> str:
            form = spelling.get(name, f"{section}{name}={{}}")
            return form.format(value) if value is not None else _bare(form)

        given = {k: v for k, v in options.items() if v is not None}
        merged = build_dataclass(type(self), {**asdict(self), **given}, prefix)
        if "strategy" not in given and "beam_size" in given:
            merged.strategy = "beam" if merged.beam_size > 1 else "greedy"
        sampling = [k for k in SAMPLING if k in given]
        if sampling and merged.strategy != "sample":
            how = spelling.get("sample", f"{section}strategy=sample")
            raise ConfigError(
                f"{', '.join(spell(k) for k in sampling)}: for sampling only (add "
                f"{how}); this decodes with {merged.strategy} search"
            )
        asked = merged.nbest if "nbest" in given else None
        beam = merged.beam_size if "beam_size" in given else None
        if asked is not None and asked < 1:
            raise ConfigError(f"{spell('nbest', asked)}: must be >= 1")
        if merged.strategy == "beam":
            if asked is not None and beam is not None and asked > beam:
                raise ConfigError(
                    f"{spell('nbest', asked)} is more than {spell('beam_size', beam)}:"
                    " a beam of K keeps at most K hypotheses"
                )
            merged.beam_size = max(merged.beam_size, merged.nbest)
        elif asked is not None and asked > 1:
            raise ConfigError(
                f"{spell('nbest', asked)}: several hypotheses need beam search "
                f"({spell('beam_size', asked)} or more), not {merged.strategy}"
            )
        else:  # a stored nbest means nothing to greedy search or sampling
            merged.nbest = 1
        merged.validate(prefix)
        return merged

    def validate(self, prefix: str = "decoding") -> None:
        at = f"{prefix}." if prefix else ""
        for name in (
            "length_penalty",
            "max_len_a",
            "temperature",
            "top_p",
            "unk_penalty",
        ):
            value = getattr(self, name)
            check(math.isfinite(value), f"{at}{name}", value, "must be finite")
        check(-(2**63) <= self.seed < 2**63, f"{at}seed", self.seed, "64-bit range")
        check(self.beam_size >= 1, f"{at}beam_size", self.beam_size, ">= 1")
        check(self.nbest >= 1, f"{at}nbest", self.nbest, "must be >= 1")
        check(
            self.strategy != "beam" or self.nbest <= self.beam_size,
            f"{at}nbest",
            self.nbest,
            f"must not exceed beam_size={self.beam_size}",
        )
        check(self.max_len_a >= 0, f"{at}max_len_a", self.max_len_a, ">= 0")
        check(
            self.max_len_b >= 1 or (self.max_len_a > 0 and self.max_len_b == 0),
            f"{at}max_len_b",
            self.max_len_b,
            ">= 1 (or 0 with max_len_a > 0): short sources would get no output",
        )
        check(self.min_len >= 0, f"{at}min_len", self.min_len, ">= 0")
        check(self.temperature > 0, f"{at}temperature", self.temperature, "> 0")
        check(self.top_k >= 0, f"{at}top_k", self.top_k, "must be >= 0")
        check(0 < self.top_p <= 1.0, f"{at}top_p", self.top_p, "in (0, 1]")
        check(self.max_tokens >= 1, f"{at}max_tokens", self.max_tokens, ">= 1")


def _bare(form: str) -> str:
    """An option's name from its spelling: ``--beam {}`` -> ``--beam``."""
    return form.split("{}")[0].rstrip(" =:")
