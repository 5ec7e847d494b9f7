"""The ``decoding`` section: search settings shared by validation, evaluation and
translation, and how a request for several hypotheses fits the search."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from transformer.config.base import ConfigError, _check


@dataclass
class DecodingConfig:
    """Search settings shared by validation, evaluation and translation."""

    strategy: Literal["greedy", "beam", "sample"] = "beam"
    beam_size: int = 5
    length_penalty: float = 0.6  # GNMT alpha; 0 = raw log-probability
    nbest: int = 1
    max_len_a: float = 1.5  # max output length = a * source length + b
    max_len_b: int = 10
    min_len: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_tokens: int = 8192  # source tokens per decoding batch
    seed: int = 0  # for sampling
    # weights and activations of transformer-eval / -translate; bf16 uses the bf16
    # matmuls of AVX-512-bf16 CPUs (README: Decoding speed); scores stay float32
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the cached decoding step (dynamic shapes, a few graphs per
    # model); the compile itself takes a while on CPU, see the README's benchmarks
    compile: bool = False

    def settle_nbest(
        self,
        asked: int | None,
        beam: int | None,
        names: tuple[str, str] = ("nbest={}", "beam_size={}"),
    ) -> None:
        """Set ``nbest`` to ``asked`` (None: keep the stored one) and make it fit
        the search: beam search widens its beam to hold ``nbest`` hypotheses unless
        ``beam`` was given too and is smaller (an error); greedy search and sampling
        give one, and asking them for more is an error. ``names``: how errors write
        the two settings (``"--nbest {}"``, ``"--beam {}"`` on the command line)."""
        nbest, beam_of = names
        if asked is not None:
            if asked < 1:
                raise ConfigError(f"{nbest.format(asked)}: must be >= 1")
            self.nbest = asked
        if self.strategy == "beam":
            if asked is not None and beam is not None and asked > beam:
                raise ConfigError(
                    f"{nbest.format(asked)} is more than {beam_of.format(beam)}: "
                    "a beam of K keeps at most K hypotheses"
                )
            self.beam_size = max(self.beam_size, self.nbest)
        elif asked is not None and asked > 1:
            raise ConfigError(
                f"{nbest.format(asked)}: several hypotheses need beam search "
                f"({beam_of.format(asked)} or more), not {self.strategy}"
            )
        else:  # a stored nbest means nothing to greedy search or sampling
            self.nbest = 1

    def validate(self, prefix: str = "decoding") -> None:
        for name in ("length_penalty", "max_len_a", "temperature", "top_p"):
            value = getattr(self, name)
            _check(math.isfinite(value), f"{prefix}.{name}", value, "must be finite")
        _check(
            -(2**63) <= self.seed < 2**63, f"{prefix}.seed", self.seed, "64-bit range"
        )
        _check(self.beam_size >= 1, f"{prefix}.beam_size", self.beam_size, ">= 1")
        _check(self.nbest >= 1, f"{prefix}.nbest", self.nbest, "must be >= 1")
        _check(
            self.strategy != "beam" or self.nbest <= self.beam_size,
            f"{prefix}.nbest",
            self.nbest,
            f"must not exceed beam_size={self.beam_size}",
        )
        _check(self.max_len_a >= 0, f"{prefix}.max_len_a", self.max_len_a, ">= 0")
        _check(
            self.max_len_b >= 1 or (self.max_len_a > 0 and self.max_len_b == 0),
            f"{prefix}.max_len_b",
            self.max_len_b,
            ">= 1 (or 0 with max_len_a > 0): short sources would get no output",
        )
        _check(self.min_len >= 0, f"{prefix}.min_len", self.min_len, ">= 0")
        _check(self.temperature > 0, f"{prefix}.temperature", self.temperature, "> 0")
        _check(self.top_k >= 0, f"{prefix}.top_k", self.top_k, "must be >= 0")
        _check(0 < self.top_p <= 1.0, f"{prefix}.top_p", self.top_p, "in (0, 1]")
        _check(self.max_tokens >= 1, f"{prefix}.max_tokens", self.max_tokens, ">= 1")
