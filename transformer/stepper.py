"""One step of an autoregressive search over the KV cache, shared by greedy
search and sampling (``transformer.search``) and beam search
(``transformer.beam``): the ``Stepper`` that feeds the decoder one token per row
and keeps (and, for bf16 on a CPU, pads) its cache's rows, the per-sentence
length limits, and the bans and forced ends applied to each step's
log-probabilities.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    ConfigError,
    DecodingConfig,
)
from transformer.guide import Guide
from transformer.inductor_cpu import vectorize_bool_masks
from transformer.models import Memory

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    tokens: list[int]  # without <bos> / <eos>, the prefix included
    score: float  # log-probability (beam: divided by the length penalty)
    unmet: tuple[int, ...] = ()  # indices of the constraints it does not meet


#: a bf16 CPU search keeps its decoder rows at a multiple of this many, or for
#: beam search of whole sentences' rows: k * ceil(16 / k) (``Stepper.reorder``)
ROW_BUCKET = 16


class Stepper:
    """Feeds one new token per row and returns next-token log-probabilities.

    With ``use_cache`` the decoder consumes only the new token; without, it re-runs
    the whole prefix every step (the slow reference, for tests and benchmarks).
    ``compile`` runs the cached steps through ``torch.compile`` with dynamic shapes
    from the third step on (the first two differ in kind: no past, and a past of
    one position, a size dynamo specialises); dynamo keeps the graphs for later
    batches.
    """

    def __init__(
        self, model: nn.Module, memory: Memory, use_cache: bool, compile: bool
    ) -> None:
        self.model, self.memory = model, memory
        self.cache = model.new_cache() if use_cache else None
        self.prefix: Tensor | None = None
        self.compiled = None
        if use_cache and compile:
            vectorize_bool_masks()
            self.compiled = torch.compile(model.decode, dynamic=True)
        weights = next(model.parameters())
        self.bucket = (
            ROW_BUCKET
            if use_cache
            and weights.device.type == "cpu"
            and weights.dtype == torch.bfloat16
            else 0
        )
        self.rows: int | None = None  # rows the cache holds, padding included
        self.sources_held: int | None = None  # source rows, after a padded reorder

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (n,) -> log-probabilities (n, V) in float32."""
        n = tokens.numel()
        if self.cache is not None:
            decode = self.model.decode
            if self.compiled is not None and self.cache.length >= 2:
                decode = self.compiled
            if self.rows is not None and self.rows > n:  # the padding rows
                tokens = torch.cat([tokens, tokens[-1:].expand(self.rows - n)])
            logits = decode(tokens[:, None], self.memory, self.cache)
        else:
            new = tokens[:, None]
            self.prefix = (
                new if self.prefix is None else torch.cat([self.prefix, new], 1)
            )
            logits = self.model.decode(self.prefix, self.memory)
        return torch.log_softmax(logits[:n, -1].float(), dim=-1)

    def prime(self, tokens: Tensor) -> Tensor:
        """tokens (n, T), the first T inputs of every row, in one decoder call ->
        log-probabilities (n, T, V) in float32."""
        if self.cache is not None:
            logits = self.model.decode(tokens, self.memory, self.cache)
        else:
            self.prefix = tokens
            logits = self.model.decode(tokens, self.memory)
        return torch.log_softmax(logits.float(), dim=-1)

    def reorder(
        self, index: Tensor, sources: Tensor | None = None, keep_sources: bool = False
    ) -> None:
        """Keep rows ``index``; the source side as in ``KVCache.reorder``.

        With ``bucket`` set, the rows kept are padded (copies of the last
        sentence's) to a multiple of ``bucket``, or of the fewest whole
        sentences that hold that many rows (20 for beam 5): then each decoder product
        sees one of a few row counts, not a new one whenever a sentence ends,
        and oneDNN, which builds a bf16 kernel for every new shape (the
        benchmarks page has the cost), builds few. ``step``
        drops the padding rows' output.
        """
        if self.cache is not None:
            if self.bucket:
                index, sources, keep_sources = self._pad(index, sources, keep_sources)
            self.cache.reorder(index, sources, keep_sources)
        else:
            # the slow reference path keeps one memory row per target row
            self.prefix = self.prefix.index_select(0, index)
            self.memory = self.memory.index_select(index)

    def _pad(
        self, index: Tensor, sources: Tensor | None, keep_sources: bool
    ) -> tuple[Tensor, Tensor | None, bool]:
        """``index`` and ``sources`` padded to whole buckets of rows, a
        sentence (its ``len(index) / len(sources)`` rows) at a time; whether
        the source rows held can still be kept as they are."""
        per = 1 if sources is None else index.numel() // sources.numel()
        groups = index.numel() // per
        unit = -(-self.bucket // per)  # sentences per bucket
        extra = -groups % unit
        if extra:
            index = torch.cat([index, index[-per:].repeat(extra)])
            if sources is not None:
                sources = torch.cat([sources, sources[-1:].expand(extra)])
        if sources is not None:
            # kept source rows must be as many as the padded sentences
            keep_sources = keep_sources and self.sources_held == sources.numel()
            if not keep_sources:
                self.sources_held = sources.numel()
        self.rows = index.numel()
        return index, sources, keep_sources


def max_lengths(src: Tensor, cfg: DecodingConfig, positions: Tensor) -> Tensor:
    """Per-sentence output budget a * |src| + b (tokens, <eos> included), at most
    the target positions the model has left, ``positions`` (B,); (B,)."""
    src_len = (src != PAD_ID).sum(1).float()
    budget = (cfg.max_len_a * src_len + cfg.max_len_b).floor().long()
    return torch.minimum(budget, positions).clamp(min=1)


def apply_bans(
    logp: Tensor, step: int, cfg: DecodingConfig, banned: Sequence[int] = ()
) -> Tensor:
    """Ban <pad>/<bos> and ``banned`` (language tags); ban <eos> before
    ``min_len``; lower <unk> by ``unk_penalty``. In place."""
    logp[:, PAD_ID] = -math.inf
    logp[:, BOS_ID] = -math.inf
    if banned:
        logp[:, list(banned)] = -math.inf
    if step < cfg.min_len:
        logp[:, EOS_ID] = -math.inf
    if cfg.unk_penalty:
        logp[:, UNK_ID] -= cfg.unk_penalty
    return logp


def force_eos(logp: Tensor, step: int, limit: Tensor, near_limit: bool) -> Tensor:
    """Force <eos> in the rows at their length limit ``limit`` (n,).

    ``near_limit`` (known on the host: ``step`` has reached the batch's shortest
    limit) turns on the forcing, a masked fill of the rows at their limit.
    """
    if near_limit:
        at_limit = step >= limit - 1  # (n,)
        eos = logp[:, EOS_ID].clone()
        logp.masked_fill_(at_limit[:, None], -math.inf)
        forced = torch.where(torch.isfinite(eos), eos, 0.0)
        logp[:, EOS_ID] = torch.where(at_limit, forced, eos)
    return logp


@torch.no_grad()
def length_limits(
    model: nn.Module, sources: list[list[int]], cfg: DecodingConfig
) -> list[int]:
    """Each source's length limit (tokens with <eos>) as the search computes it;
    sources: pieces without <eos>."""
    if not sources:
        return []
    from transformer.data import pad_sources

    src = pad_sources(sources)
    positions = model.target_positions(src.to(next(model.parameters()).device))
    return max_lengths(src, cfg, positions.cpu()).tolist()


def prime_prefix(
    stepper: Stepper, guide: Guide, bos: int, cfg: DecodingConfig
) -> tuple[Tensor, Tensor]:
    """Run <bos> and the batch's common prefix through the decoder in one call.

    Returns the prefix's log-probability per sentence (B,) (as the search counts
    it: <unk> lowered by ``unk_penalty``) and the next step's log-probabilities
    (B, V).
    """
    prefix = guide.prefix[:, : guide.common]  # (B, m)
    start = torch.full_like(prefix[:, :1], bos)
    logp = stepper.prime(torch.cat([start, prefix], 1))  # (B, m + 1, V)
    picked = logp[:, :-1].gather(2, prefix[..., None]).squeeze(-1)  # (B, m)
    if cfg.unk_penalty:
        picked = picked - cfg.unk_penalty * (prefix == UNK_ID)
    return picked.sum(1), logp[:, -1]


_warned_min_len = False


def check_min_len(min_len: int, max_positions: int, model: str) -> None:
    """Refuse a ``min_len`` no output of ``model`` (a file or folder) can reach."""
    if min_len >= max_positions:
        raise ConfigError(
            f"decoding.min_len: {min_len} must be below the "
            f"model.max_positions={max_positions} of {model}: no output can be "
            "that long"
        )


def warn_min_len_cut(min_len: int, shortest: int) -> None:
    """Warn once when ``min_len`` is beyond a sentence's length limit ``shortest``
    (tokens with <eos>), which then wins."""
    global _warned_min_len
    if min_len >= shortest and not _warned_min_len:
        _warned_min_len = True
        log.warning(
            "decoding.min_len=%d is beyond the length limit of some sentences "
            "(max_len_a * source length + max_len_b, and the model's positions; "
            "here %d tokens with <eos>): their output ends at the limit",
            min_len,
            shortest,
        )


def limit_range(limit: Tensor, min_len: int) -> tuple[int, int]:
    """The shortest and longest length limit of a batch (one read per batch)."""
    low, high = limit.aminmax()
    shortest, longest = torch.stack([low, high]).tolist()
    warn_min_len_cut(min_len, shortest)
    return shortest, longest
