"""Autoregressive search over the KV cache: greedy, beam search and sampling.

Every sentence of a batch stops at its own <eos>; finished sentences are dropped
from the batch (and from the cache) so that they stop costing compute.

The step loops read one thing back from the device per step: which rows are still
live (one ``nonzero``), the "all done?" check. Finished hypotheses stay on the
device until the batch is done; length limits, bans and scores are tensor
operations. The searches run in ``torch.inference_mode`` (no view or version
tracking: 2-4% less time than ``no_grad`` on 2 CPU threads).

Per-sentence controls (``transformer.controls.PieceControls``) steer every search
through one guide (``Guide``): a target prefix is forced (its common part run
through the decoder in one call, then the search goes on from the cache),
forbidden phrases become banned continuations, and required phrases
(constraints, beam search only) are met by dynamic beam allocation (Post & Vilar
2018, vectorized as Hu et al. 2019): each step's candidates are the best ones
of the sentence, each beam's best one and each beam's next piece of every
constraint it has not met; they are ranked in banks by how many constraint
pieces they hold, and the beam takes the best of each bank in turn, fullest bank
first. A hypothesis may end only once it meets every constraint, or at its
length limit (then its result names the constraints it missed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    ConfigError,
    DecodingConfig,
)
from transformer.controls import PieceControls
from transformer.guide import Guide, allocate, bits, guide_of
from transformer.models import Memory

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    tokens: list[int]  # without <bos> / <eos>, the prefix included
    score: float  # log-probability (beam: divided by the length penalty)
    unmet: tuple[int, ...] = ()  # indices of the constraints it does not meet


#: a bf16 CPU search keeps its decoder rows at a multiple of this many, or for
#: beam search of whole sentences' rows: k * ceil(16 / k) (``_Stepper.reorder``)
ROW_BUCKET = 16


class _Stepper:
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
        and oneDNN, which builds a bf16 kernel for every new shape (about
        1 ms each, ``benchmarks/decode_amx.json``), builds few. ``step``
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


def _ban(
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


def _force_eos(logp: Tensor, step: int, limit: Tensor, near_limit: bool) -> Tensor:
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


def _prime(
    stepper: _Stepper, guide: Guide, bos: int, cfg: DecodingConfig
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


def _limit_range(limit: Tensor, min_len: int) -> tuple[int, int]:
    """The shortest and longest length limit of a batch (one read per batch)."""
    low, high = limit.aminmax()
    shortest, longest = torch.stack([low, high]).tolist()
    warn_min_len_cut(min_len, shortest)
    return shortest, longest


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the ``top_k`` largest logits and the smallest set of tokens whose
    probability reaches ``top_p`` (the nucleus); the rest become -inf. (n, V)."""
    logits = logits.clone()
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p  # the first token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits.masked_fill_(drop, -math.inf)
    return logits


#: columns per block of ``topk_rows``
TOPK_BLOCK = 64


def topk_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` of a (n, V) tensor with many columns (the
    vocabulary), in two passes that touch each value once: the maximum of every
    block of ``TOPK_BLOCK`` columns, then the top ``k`` among the values of the
    ``k`` blocks with the largest maxima. Those blocks hold the top ``k`` values:
    a block holding one of them has a maximum at least as large, and only blocks
    holding a larger value can rank above it. (values, indices), sorted; among
    equal values the indices may differ from ``topk``'s, whose order among
    equal values is unspecified too. 2.3x ``topk`` on 600 rows of 8,000 here.
    """
    n, width = x.shape
    blocks = width // TOPK_BLOCK
    if blocks < 2 * k or x.device.type != "cpu":
        return x.topk(k, dim=-1)
    main = blocks * TOPK_BLOCK
    grouped = x[:, :main].reshape(n, blocks, TOPK_BLOCK)
    best = grouped.amax(-1).topk(k, dim=-1).indices  # (n, k)
    offsets = torch.arange(TOPK_BLOCK, device=x.device)
    values = grouped.gather(1, best[..., None].expand(-1, -1, TOPK_BLOCK))
    columns = best[..., None] * TOPK_BLOCK + offsets  # (n, k, block)
    values, columns = values.view(n, -1), columns.view(n, -1)
    if main < width:  # the last, partial block: its columns are candidates too
        values = torch.cat([values, x[:, main:]], 1)
        tail = torch.arange(main, width, device=x.device).expand(n, -1)
        columns = torch.cat([columns, tail], 1)
    top, at = values.topk(k, dim=-1)
    return top, columns.gather(1, at)


def _pick_greedy(logp: Tensor, generator: torch.Generator | None) -> Tensor:
    # max(-1).indices: the same first-maximum index as argmax(-1), from a faster
    # CPU kernel for float32 log-probabilities of a large vocabulary
    return logp.max(-1).indices


def _sampler(cfg: DecodingConfig) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    def pick(logp: Tensor, generator: torch.Generator | None) -> Tensor:
        logits = filter_logits(logp / cfg.temperature, cfg.top_k, cfg.top_p)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return pick


@torch.inference_mode()
def _greedy_or_sample(
    model: nn.Module,
    src: Tensor,
    cfg: DecodingConfig,
    pick: Callable[[Tensor, torch.Generator | None], Tensor],
    use_cache: bool,
    generator: torch.Generator | None,
    bos: int = BOS_ID,
    banned: Sequence[int] = (),
    controls: Sequence[PieceControls | None] | None = None,
) -> list[list[Hypothesis]]:
    batch = src.size(0)
    limit = max_lengths(src, cfg, model.target_positions(src))
    shortest, longest = _limit_range(limit, cfg.min_len)
    stepper = _Stepper(model, model.encode(src), use_cache, cfg.compile)
    alive = torch.arange(batch, device=src.device)  # original row of each live row
    out = torch.full((batch, longest), PAD_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(batch, device=src.device)
    tokens = torch.full((batch,), bos, dtype=torch.long, device=src.device)
    guide = guide_of(controls, batch, model.cfg.tgt_vocab_size, src.device)
    pending, first = None, 0  # the primed log-probabilities of step ``first``
    if guide is not None:
        if guide.has_constraints:
            raise ValueError(
                f"constraints need beam search, not {cfg.strategy} (a beam of "
                "one would force their pieces at once)"
            )
        guide.check(limit)
        tails, met = guide.start()
        if guide.common:
            first = guide.common
            prefix_scores, pending = _prime(stepper, guide, bos, cfg)
            scores += prefix_scores
            out[:, :first] = guide.prefix[:, :first]
            tokens = guide.prefix[:, first - 1]
    for step in range(first, longest):
        raw = stepper.step(tokens) if pending is None else pending
        pending = None
        logp = _ban(raw, step, cfg, banned)
        if guide is not None:
            forced = guide.forced(logp, alive, step)
            guide.ban(logp, alive, tails, met, step)
        _force_eos(logp, step, limit[alive], step >= shortest - 1)
        if guide is not None:
            guide.force(logp, forced)
        tokens = pick(logp, generator)
        out[alive, step] = tokens
        scores[alive] += logp.gather(1, tokens[:, None]).squeeze(1)
        if guide is not None:
            tails, met = guide.advance(tails, met, alive, tokens)
        keep = (tokens != EOS_ID).nonzero().squeeze(1)  # the step's one host read
        if keep.numel() < tokens.numel():
            if keep.numel() == 0:
                break
            stepper.reorder(keep)
            alive, tokens = alive[keep], tokens[keep]
            if guide is not None:
                tails, met = tails[keep], met[keep]
    results = []
    for row, score in zip(out.tolist(), scores.tolist(), strict=True):
        end = row.index(EOS_ID) if EOS_ID in row else len(row)
        results.append([Hypothesis(row[:end], score)])
    return results


def length_penalty(length: int | Tensor, alpha: float):
    """GNMT length penalty ((5 + |Y|) / 6) ^ alpha."""
    return ((5.0 + length) / 6.0) ** alpha


class _Finished:
    """Finished beam hypotheses, kept on the device until the batch is done.

    Each sentence has ``2K`` slots: a live sentence holds fewer than K finished
    hypotheses and a step finishes at most K more. Scores are log-probabilities
    divided by the length penalty in float64, the precision of Python floats, so
    that ties and bounds compare as in a plain Python beam search. Slot ``2K``
    takes the writes of candidates that did not finish. ``unmet`` holds a bit
    mask of the constraints each one misses (only at the length limit can a
    hypothesis end with some unmet).
    """

    def __init__(self, batch: int, k: int, longest: int, device: torch.device):
        self.slots = 2 * k
        size, ids = (batch, self.slots + 1), {"dtype": torch.long, "device": device}
        self.scores = torch.full(size, -math.inf, dtype=torch.float64, device=device)
        self.lengths = torch.zeros(size, **ids)
        self.unmet = torch.zeros(size, **ids)
        self.constrained = False  # were unmet masks given (else all zero)?
        self.tokens = torch.zeros(*size, longest, **ids)
        self.count = torch.zeros(batch, **ids)

    def add(
        self,
        sent: Tensor,
        ends: Tensor,
        scores: Tensor,
        prefixes: Tensor,
        lp,
        unmet: Tensor | None = None,
    ):
        """Store the candidates ``ends`` (n, K) of sentences ``sent`` (n,): their
        log-probabilities ``scores`` (n, K), tokens before <eos> ``prefixes``
        (n, K, L), ``lp`` the length penalty of L + 1 tokens, and the bit masks
        of their unmet constraints ``unmet`` (n, K)."""
        rank = ends.long().cumsum(1) - 1  # (n, K) order among the row's new ones
        slot = torch.where(ends, self.count[sent, None] + rank, self.slots)
        rows = sent[:, None].expand_as(slot)
        self.scores[rows, slot] = scores.double() / lp
        self.lengths[rows, slot] = prefixes.size(2)
        self.tokens[rows, slot, : prefixes.size(2)] = prefixes
        if unmet is not None:
            self.unmet[rows, slot] = unmet
            self.constrained = True
        self.count[sent] += ends.sum(1)

    def done(self, sent: Tensor, best_alive: Tensor, bound_lp: Tensor, k, nbest):
        """(n,) bool: sentence is done with ``k`` finished hypotheses, with no live
        beam left, or when no live beam can beat its ``nbest``-th finished one even
        at full length (live scores only fall; the penalty grows up to the limit,
        whose penalty is ``bound_lp``)."""
        count = self.count[sent]
        nth = self.scores[sent, : self.slots].topk(nbest, dim=1).values[:, -1]
        bound = best_alive.double() / bound_lp
        return (
            (count >= k)
            | (best_alive == -math.inf)
            | ((count >= nbest) & (nth >= bound))
        )

    def results(self, nbest: int) -> list[list[Hypothesis]]:
        """The ``nbest`` best of each sentence, those that meet every constraint
        first (ties in the order they finished)."""
        counts, scores = self.count.tolist(), self.scores.tolist()
        lengths, tokens = self.lengths.tolist(), self.tokens.tolist()
        unmet = self.unmet.tolist() if self.constrained else None
        results = []
        for s, count in enumerate(counts):
            hyps = [
                (
                    bin(mask).count("1"),
                    -scores[s][j],
                    j,
                    Hypothesis(tokens[s][j][: lengths[s][j]], scores[s][j], bits(mask)),
                )
                for j in range(count)
                for mask in [unmet[s][j] if unmet else 0]
            ]
            results.append([h[-1] for h in sorted(hyps)[:nbest]])
        return results


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    src: Tensor,
    cfg: DecodingConfig,
    use_cache: bool = True,
    bos: int = BOS_ID,
    banned: Sequence[int] = (),
    controls: Sequence[PieceControls | None] | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search; returns ``cfg.nbest`` hypotheses per sentence, best first.

    Scores are log-probabilities divided by the GNMT length penalty. A sentence stops
    once it holds ``beam_size`` finished hypotheses, or once no live beam can beat
    its n-th best finished one, or at its length limit. ``controls``: per
    sentence, as ``generate``'s.
    """
    k, alpha = cfg.beam_size, cfg.length_penalty
    batch, device = src.size(0), src.device
    limit_all = max_lengths(src, cfg, model.target_positions(src))
    shortest, longest = _limit_range(limit_all, cfg.min_len)
    # the penalty at each length limit bounds what a live beam can still reach
    # (alpha <= 0: the raw score does); computed in Python as for finished ones
    limit_penalty = torch.tensor(
        [length_penalty(n, alpha) if alpha > 0 else 1.0 for n in range(longest + 1)],
        dtype=torch.float64,
        device=device,
    )
    stepper = _Stepper(model, model.encode(src), use_cache, cfg.compile)
    finished = _Finished(batch, k, longest, device)
    sent = torch.arange(batch, device=device)  # original sentence of each live one
    beam_scores = torch.zeros(batch, k, device=device)
    beam_scores[:, 1:] = -math.inf  # all beams start equal: expand only the first
    beam_tokens = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    tokens = torch.full((batch,), bos, dtype=torch.long, device=device)
    rows_per_sentence = 1  # the first step runs once per sentence, not once per beam
    guide = guide_of(controls, batch, model.cfg.tgt_vocab_size, device)
    dba = guide is not None and guide.has_constraints
    pending, first = None, 0  # the primed log-probabilities of step ``first``
    if guide is not None:
        guide.check(limit_all)
        tails, met = guide.start()
        if guide.common:
            first = guide.common
            prefix_scores, pending = _prime(stepper, guide, bos, cfg)
            beam_scores[:, 0] = prefix_scores
            beam_tokens = guide.prefix[:, None, :first].expand(-1, k, -1)
    for step in range(first, longest):
        n = sent.numel()
        limit = limit_all[sent]  # (n,)
        raw = stepper.step(tokens) if pending is None else pending
        pending = None
        logp = _ban(raw, step, cfg, banned)
        if guide is not None:
            row_sent = sent.repeat_interleave(rows_per_sentence)
            forced = guide.forced(logp, row_sent, step)
            guide.ban(logp, row_sent, tails, met, step)
        _force_eos(
            logp,
            step,
            limit.repeat_interleave(rows_per_sentence),
            step >= shortest - 1,
        )
        if guide is not None:
            guide.force(logp, forced)
        rows = rows_per_sentence
        unmet = None
        if dba:
            top_scores, origin, top_tokens, cand_tails, cand_met = allocate(
                logp, beam_scores, rows, k, guide, sent, tails, met
            )
            unmet = guide.unmet(cand_met[:, :k])
        else:
            # a sentence's best 2K candidates are among the best 2K of each row
            width = min(2 * k, logp.size(-1))
            row_scores, row_tokens = topk_rows(logp, width)  # (n * rows, W)
            cand = beam_scores[:, :rows, None] + row_scores.view(n, rows, width)
            cand, row_tokens = cand.view(n, -1), row_tokens.view(n, -1)
            if cand.size(1) < 2 * k:  # tiny vocabularies: pad, impossible ones
                cand = F.pad(cand, (0, 2 * k - cand.size(1)), value=-math.inf)
                row_tokens = F.pad(row_tokens, (0, 2 * k - row_tokens.size(1)))
            top_scores, pos = cand.topk(2 * k, dim=-1)
            origin = (pos // width).clamp(max=rows - 1)  # (n, 2K) beam extended
            top_tokens = row_tokens.gather(1, pos)
        finite = torch.isfinite(top_scores)
        is_eos = (top_tokens == EOS_ID) & finite
        # finalize <eos> candidates ranked within the top K
        prefixes = beam_tokens[torch.arange(n, device=device)[:, None], origin[:, :k]]
        finished.add(
            sent,
            is_eos[:, :k],
            top_scores[:, :k],
            prefixes,  # (n, K, step)
            length_penalty(step + 1, alpha),
            unmet,
        )
        # the best K candidates that do not end here continue
        rank = torch.where(is_eos | ~finite, math.inf, 0.0) + torch.arange(
            top_scores.size(1), device=device
        )
        keep_cols = rank.argsort(dim=1)[:, :k]  # (n, K)
        next_scores = top_scores.gather(1, keep_cols)
        next_scores = torch.where(
            rank.gather(1, keep_cols).isfinite(), next_scores, -math.inf
        )
        next_origin = origin.gather(1, keep_cols)
        next_tokens = top_tokens.gather(1, keep_cols)
        best_alive = next_scores.max(dim=1).values  # (n,)
        done = finished.done(sent, best_alive, limit_penalty[limit], k, cfg.nbest)
        live_rows = (~done).nonzero().squeeze(1)  # the step's one host read
        if live_rows.numel() == 0:
            break
        all_live = live_rows.numel() == n
        # cache rows to keep: sentence r, beam origin b -> row r * rows + b
        base = live_rows[:, None] * rows_per_sentence  # (n', 1)
        if rows_per_sentence > 1:
            src_rows = base + next_origin[live_rows]
        else:
            src_rows = base.expand(-1, k)  # one row per sentence becomes K beams
        # the cached cross K/V keep one row per sentence, shared by its beams
        stepper.reorder(src_rows.reshape(-1), live_rows, keep_sources=all_live)
        if guide is not None:
            if dba:
                cols = keep_cols[live_rows]
                at = live_rows[:, None]
                tails = cand_tails[at, cols].reshape(-1, tails.size(1))
                met = cand_met[at, cols].reshape(-1, met.size(1))
            else:
                rows_of = src_rows.reshape(-1)
                tails, met = guide.advance(
                    tails[rows_of],
                    met[rows_of],
                    sent[live_rows].repeat_interleave(k),
                    next_tokens[live_rows].reshape(-1),
                )
        beam_tokens = torch.cat(
            [
                beam_tokens[live_rows[:, None], next_origin[live_rows]],
                next_tokens[live_rows, :, None],
            ],
            dim=2,
        )
        beam_scores = next_scores[live_rows]
        tokens = next_tokens[live_rows].reshape(-1)
        sent = sent[live_rows]
        rows_per_sentence = k
    return finished.results(cfg.nbest)


def generate(
    model: nn.Module,
    src: Tensor,
    cfg: DecodingConfig,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    bos: int = BOS_ID,
    banned: Sequence[int] = (),
    controls: Sequence[PieceControls | None] | None = None,
) -> list[list[Hypothesis]]:
    """Decode a (B, S) source batch with the strategy in ``cfg``.

    ``bos``: the decoder's first input (a language tag in place of ``<bos>``);
    ``banned``: ids never emitted, besides ``<pad>`` and ``<bos>``;
    ``controls``: per sentence, a prefix, required and forbidden phrases
    (``PieceControls``, None for none; required phrases need beam search).
    """
    if cfg.strategy == "beam":
        return beam_search(model, src, cfg, use_cache, bos, banned, controls)
    pick = _sampler(cfg) if cfg.strategy == "sample" else _pick_greedy
    return _greedy_or_sample(
        model, src, cfg, pick, use_cache, generator, bos, banned, controls
    )


def _check_sources(sources: list[list[int]], vocab_size: int) -> None:
    """Ids enter here: check their range on the host, once, not in every step."""
    for i, ids in enumerate(sources):
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(
                f"sentence {i + 1}: source ids must be in [0, {vocab_size}), "
                f"got range [{min(ids)}, {max(ids)}]"
            )


def _check_controls(
    controls: Sequence[PieceControls | None], count: int, vocab_size: int
) -> None:
    """One entry per sentence, target ids in range (checked once, on the host)."""
    if len(controls) != count:
        raise ValueError(f"{len(controls)} controls for {count} sentences")
    for i, c in enumerate(controls):
        if c is None:
            continue
        ids = [*c.prefix, *(t for p in (*c.constraints, *c.forbid) for t in p)]
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(
                f"sentence {i + 1}: control ids must be in [0, {vocab_size})"
            )
        if any(not p for p in (*c.constraints, *c.forbid)):
            raise ValueError(f"sentence {i + 1}: an empty phrase")


def decode_corpus(
    model: nn.Module,
    sources: list[list[int]],
    cfg: DecodingConfig,
    device: torch.device,
    use_cache: bool = True,
    progress: bool = False,
    bos: int = BOS_ID,
    banned: Sequence[int] = (),
    controls: Sequence[PieceControls | None] | None = None,
) -> list[list[Hypothesis]]:
    """Decode many sentences (pieces, no <eos>) in length-sorted batches.

    Batches hold at most ``cfg.max_tokens`` source tokens (divided by the beam size
    for beam search); results come back in the input order. ``bos``, ``banned``,
    ``controls``: as ``generate``'s. Sentences with controls are batched with
    those whose prefix has the same length (so that one decoder call runs every
    prefix of a batch) and that have constraints too, or not.
    """
    from tqdm import tqdm

    from transformer.data import pad_sources, token_batches

    _check_sources(sources, model.cfg.src_vocab_size)
    if controls is not None:
        _check_controls(controls, len(sources), model.cfg.tgt_vocab_size)
    lengths = [len(s) + 1 for s in sources]
    budget = cfg.max_tokens // (cfg.beam_size if cfg.strategy == "beam" else 1)
    budget = max(budget, max(lengths, default=1))
    groups: dict[tuple[int, bool], list[int]] = {}
    for i in range(len(sources)):
        c = controls[i] if controls is not None else None
        key = (len(c.prefix), bool(c.constraints)) if c is not None else (0, False)
        groups.setdefault(key, []).append(i)
    batches = [
        indices
        for _, group in sorted(groups.items())
        for indices in token_batches(
            lengths, lengths, budget, ids=np.asarray(group, dtype=np.int64)
        )
    ]
    generator = None
    if cfg.strategy == "sample":
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    results: list[list[Hypothesis] | None] = [None] * len(sources)
    was_training = model.training
    model.eval()
    with tqdm(
        total=len(sources), disable=not progress, desc="decoding", unit="sent"
    ) as bar:
        for indices in batches:
            src = pad_sources([sources[i] for i in indices]).to(device)
            batch_controls = (
                None if controls is None else [controls[i] for i in indices]
            )
            hyps = generate(
                model, src, cfg, use_cache, generator, bos, banned, batch_controls
            )
            for i, h in zip(indices, hyps, strict=True):
                results[i] = h
            bar.update(len(indices))
    model.train(was_training)
    return results
