"""Autoregressive search over the KV cache: greedy, beam search and sampling.

Every sentence of a batch stops at its own <eos>; finished sentences are dropped
from the batch (and from the cache) so that they stop costing compute.

The step loops read one thing back from the device per step: which rows are still
live (one ``nonzero``), the "all done?" check. Finished hypotheses stay on the
device until the batch is done; length limits, bans and scores are tensor
operations.

Per-sentence controls (``transformer.controls.PieceControls``) steer every search
through one guide (``_Guide``): a target prefix is forced (its common part run
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
from transformer.models import Memory

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    tokens: list[int]  # without <bos> / <eos>, the prefix included
    score: float  # log-probability (beam: divided by the length penalty)
    unmet: tuple[int, ...] = ()  # indices of the constraints it does not meet


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

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (n,) -> log-probabilities (n, V) in float32."""
        if self.cache is not None:
            decode = self.model.decode
            if self.compiled is not None and self.cache.length >= 2:
                decode = self.compiled
            logits = decode(tokens[:, None], self.memory, self.cache)
        else:
            new = tokens[:, None]
            self.prefix = (
                new if self.prefix is None else torch.cat([self.prefix, new], 1)
            )
            logits = self.model.decode(self.prefix, self.memory)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

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
        """Keep rows ``index``; the source side as in ``KVCache.reorder``."""
        if self.cache is not None:
            self.cache.reorder(index, sources, keep_sources)
        else:
            # the slow reference path keeps one memory row per target row
            self.prefix = self.prefix.index_select(0, index)
            self.memory = self.memory.index_select(index)


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


# --- per-sentence controls ---


def _right_aligned(
    phrases: list[list[tuple[int, ...]]], width: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Per sentence, phrases of at most ``width`` ids, each right-aligned in a row
    of ``width``: ids (B, P, width) (-2 where none), ``valid`` (B, P, width) at
    the phrase's positions, ``real`` (B, P) at real phrases; P >= 1."""
    count = max(1, max((len(p) for p in phrases), default=0))
    ids = torch.full((len(phrases), count, width), -2, dtype=torch.long)
    real = torch.zeros(len(phrases), count, dtype=torch.bool)
    for b, sentence in enumerate(phrases):
        for p, phrase in enumerate(sentence):
            real[b, p] = True
            if phrase:
                ids[b, p, width - len(phrase) :] = torch.tensor(phrase)
    return ids.to(device), (ids >= 0).to(device), real.to(device)


def _match(tails: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Do the tails (m, W) end with the phrases ``ids`` (m, ..., w), w <= W, at
    their ``valid`` positions? (m, ...) bool; an empty phrase always does."""
    w = ids.size(-1)
    tail = tails[:, tails.size(1) - w :]  # (m, w): the last w tokens
    shape = (tails.size(0),) + (1,) * (ids.dim() - 2) + (w,)
    return ((tail.view(shape) == ids) | ~valid).all(-1)


class _Guide:
    """The per-sentence controls of a batch as tensors, and what they do to a step.

    A hypothesis' state is its tail, the last ``width`` tokens of its output (-1
    before the first; (m, W)), and which constraints it has met (m, C). Phrases
    are matched right-aligned against the tail: a forbidden phrase of n pieces
    bans its last piece when the tail ends with the first n - 1; a constraint is
    met when the tail ends with it; its progress is the longest beginning of it
    that the tail ends with. Rows are addressed by their sentence ``sent`` (m,).
    """

    def __init__(
        self, controls: Sequence[PieceControls | None], vocab: int, device
    ) -> None:
        self.controls = [c or PieceControls() for c in controls]
        self.vocab, self.device = vocab, device
        self._prefixes()
        self._forbidden()
        self._required()
        self.width = max(self.forbid.size(-1), self.full.size(-1), 1)

    def _prefixes(self) -> None:
        """Prefix ids (B, P) padded with <pad>, their lengths (B,), and the
        pieces banned right after a prefix that ends a word (B, V) or None."""
        ctl, device = self.controls, self.device
        lengths = [len(c.prefix) for c in ctl]
        self.common, self.longest_prefix = min(lengths), max(lengths)
        self.prefix_len = torch.tensor(lengths, device=device)
        prefix = torch.full((len(ctl), max(1, self.longest_prefix)), PAD_ID)
        for b, c in enumerate(ctl):
            prefix[b, : len(c.prefix)] = torch.tensor(c.prefix, dtype=torch.long)
        self.prefix = prefix.to(device)
        self.after = None
        if any(c.after_prefix for c in ctl):
            after = torch.zeros(len(ctl), self.vocab, dtype=torch.bool)
            for b, c in enumerate(ctl):
                after[b, list(c.after_prefix)] = True
            self.after = after.to(device)

    def _forbidden(self) -> None:
        """Forbidden phrases: their first n - 1 pieces right-aligned (B, P, n - 1)
        and the last piece (B, P), which they ban (``vocab``: none)."""
        ctl = self.controls
        self.has_forbid = any(c.forbid for c in ctl)
        width = max((len(f) - 1 for c in ctl for f in c.forbid), default=0)
        self.forbid, self.forbid_valid, self.forbid_real = _right_aligned(
            [[f[:-1] for f in c.forbid] for c in ctl], width, self.device
        )
        last = torch.full(self.forbid_real.shape, self.vocab, dtype=torch.long)
        for b, c in enumerate(ctl):
            for p, f in enumerate(c.forbid):
                last[b, p] = f[-1]
        self.forbid_last = last.to(self.device)

    def _required(self) -> None:
        """Constraints: whole (B, C, L) right-aligned, their pieces (B, C, L)
        left-aligned and lengths (B, C) (0: none), and their beginnings of 1 to
        L - 1 pieces (B, C, K, K), K = L - 1, right-aligned."""
        ctl, device = self.controls, self.device
        self.has_constraints = any(c.constraints for c in ctl)
        longest = max((len(p) for c in ctl for p in c.constraints), default=1)
        self.full, self.full_valid, real = _right_aligned(
            [list(c.constraints) for c in ctl], longest, device
        )
        count, k = real.size(1), longest - 1
        lengths = torch.zeros(len(ctl), count, dtype=torch.long)
        pieces = torch.zeros(len(ctl), count, longest, dtype=torch.long)
        begin = torch.full((len(ctl), count, k, k), -2, dtype=torch.long)
        for b, c in enumerate(ctl):
            for j, phrase in enumerate(c.constraints):
                lengths[b, j] = len(phrase)
                pieces[b, j, : len(phrase)] = torch.tensor(phrase)
                for n in range(1, len(phrase)):
                    begin[b, j, n - 1, k - n :] = torch.tensor(phrase[:n])
        steps = torch.arange(1, k + 1)
        self.total = int(lengths.sum(1).max())  # the fullest bank
        self.pieces, self.c_len = pieces.to(device), lengths.to(device)
        self.begin, self.begin_valid = begin.to(device), (begin >= 0).to(device)
        self.begin_real = (steps < lengths[..., None]).to(device)  # (B, C, K)
        self.begin_steps = steps.to(device)

    def check(self, limit: Tensor) -> None:
        """A prefix must leave room for </s> within its sentence's ``limit``."""
        if self.longest_prefix and bool((self.prefix_len > limit - 1).any()):
            row = int((self.prefix_len > limit - 1).nonzero()[0, 0])
            raise ValueError(
                f"sentence {row + 1}: a prefix of {int(self.prefix_len[row])} "
                f"pieces leaves no room for </s> within {int(limit[row])} tokens"
            )

    def start(self) -> tuple[Tensor, Tensor]:
        """Tails (B, W) and met constraints (B, C) after the common prefix."""
        m, w = self.common, self.width
        tails = torch.full((len(self.controls), w), -1, dtype=torch.long)
        met = ~self.full_valid.any(-1).cpu()  # (B, C): padding is met
        for b, c in enumerate(self.controls):
            seen = c.prefix[:m]
            if seen:
                tail = seen[-w:]
                tails[b, w - len(tail) :] = torch.tensor(tail)
            for j, phrase in enumerate(c.constraints):
                n = len(phrase)
                met[b, j] = any(
                    tuple(seen[i : i + n]) == phrase for i in range(len(seen) - n + 1)
                )
        return tails.to(self.device), met.to(self.device)

    def forced(self, logp: Tensor, sent: Tensor, step: int):
        """Rows still inside their prefix at ``step``: (which (m,), their piece
        (m,), its log-probability (m,)), read before any ban; None after every
        prefix."""
        if step >= self.longest_prefix:
            return None
        inside = self.prefix_len[sent] > step
        piece = self.prefix[sent, step]
        return inside, piece, logp.gather(1, piece[:, None]).squeeze(1)

    def force(self, logp: Tensor, forced) -> None:
        """Leave rows inside their prefix one choice: its next piece."""
        if forced is None:
            return
        inside, piece, value = forced
        keep = logp.gather(1, piece[:, None]).squeeze(1)
        logp.masked_fill_(inside[:, None], -math.inf)
        logp.scatter_(1, piece[:, None], torch.where(inside, value, keep)[:, None])

    def ban(
        self, logp: Tensor, sent: Tensor, tails: Tensor, met: Tensor, step: int
    ) -> None:
        """Ban the last piece of every forbidden phrase a row's tail would
        complete, <eos> while a constraint is unmet, and the pieces that continue
        a word right after a prefix that ends one. In place."""
        if self.has_forbid:
            hit = _match(tails, self.forbid[sent], self.forbid_valid[sent])
            hit &= self.forbid_real[sent]  # (m, P)
            count = logp.new_zeros(logp.size(0), self.vocab + 1)
            count.scatter_add_(1, self.forbid_last[sent], hit.float())
            logp.masked_fill_(count[:, : self.vocab] > 0, -math.inf)
        if self.has_constraints:
            logp[:, EOS_ID].masked_fill_(~met.all(-1), -math.inf)
        if self.after is not None and step <= self.longest_prefix:
            at = (self.prefix_len[sent] == step) & (step > 0)
            logp.masked_fill_(at[:, None] & self.after[sent], -math.inf)

    def advance(
        self, tails: Tensor, met: Tensor, sent: Tensor, tokens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The state after each row takes ``tokens`` (m,)."""
        tails = torch.cat([tails[:, 1:], tokens[:, None]], 1)
        if self.has_constraints:
            met = met | _match(tails, self.full[sent], self.full_valid[sent])
        return tails, met

    def progress(self, tails: Tensor, sent: Tensor) -> Tensor:
        """(m, C): the longest beginning of each constraint the tail ends with."""
        if self.begin.size(-1) == 0:
            return torch.zeros_like(self.c_len[sent])
        hit = _match(tails, self.begin[sent], self.begin_valid[sent])  # (m, C, K)
        hit &= self.begin_real[sent]
        return (hit * self.begin_steps).amax(-1)

    def next_pieces(
        self, tails: Tensor, met: Tensor, sent: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per row and constraint, the piece that takes it one further (m, C),
        and whether there is one (it is not met yet)."""
        step = self.progress(tails, sent)
        piece = self.pieces[sent].gather(2, step[..., None]).squeeze(-1)
        return piece, ~met

    def bank(self, met: Tensor, progress: Tensor, sent: Tensor) -> Tensor:
        """Constraint pieces a hypothesis holds: met ones whole, the others'
        progress; met, progress (m, C) -> (m,)."""
        return torch.where(met, self.c_len[sent], progress).sum(-1)

    def unmet(self, met: Tensor) -> Tensor:
        """(..., C) met -> a bit mask of the unmet ones (...,) (C <= 62)."""
        bits = 1 << torch.arange(met.size(-1), device=met.device)
        return ((~met).long() * bits).sum(-1)


def _guide(
    controls: Sequence[PieceControls | None] | None, batch: int, vocab: int, device
) -> _Guide | None:
    """The guide of a batch's controls; None when no sentence has any."""
    if controls is None or all(c is None or c.empty for c in controls):
        return None
    if len(controls) != batch:
        raise ValueError(f"{len(controls)} controls for {batch} sentences")
    return _Guide(controls, vocab, device)


def _prime(
    stepper: _Stepper, guide: _Guide, bos: int, cfg: DecodingConfig
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


@torch.no_grad()
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
    guide = _guide(controls, batch, model.cfg.tgt_vocab_size, src.device)
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
                    Hypothesis(
                        tokens[s][j][: lengths[s][j]], scores[s][j], _bits(mask)
                    ),
                )
                for j in range(count)
                for mask in [unmet[s][j] if unmet else 0]
            ]
            results.append([h[-1] for h in sorted(hyps)[:nbest]])
        return results


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(b for b in range(mask.bit_length()) if mask >> b & 1)


def _allocate(
    logp: Tensor,
    beam_scores: Tensor,
    rows: int,
    k: int,
    guide: _Guide,
    sent: Tensor,
    tails: Tensor,
    met: Tensor,
) -> tuple[Tensor, ...]:
    """Dynamic beam allocation: the 2K candidates of each sentence in the order
    the beam takes them.

    Candidates: the sentence's best 2K, each beam's best, and each beam's next
    piece of every constraint it has not met (a candidate found twice counts
    once). Each falls in the bank of the constraint pieces it holds; within a
    bank they rank by score, and the order takes the best of every bank, fullest
    first, then the second best of every bank, and so on.

    Args:
        logp: (n * rows, V) the step's log-probabilities, bans applied.
        beam_scores: (n, K) the live beams' scores.
        sent: (n,) the sentences; tails, met: the rows' states.

    Returns:
        scores, origin (beam), tokens (n, 2K); the candidates' tails (n, 2K, W)
        and met constraints (n, 2K, C).
    """
    n, vocab, device = beam_scores.size(0), logp.size(-1), logp.device
    width = min(2 * k, vocab)
    row_scores, row_tokens = logp.topk(width, dim=-1)  # (n * rows, W)
    cand = beam_scores[:, :rows, None] + row_scores.view(n, rows, width)
    flat, flat_tokens = cand.view(n, -1), row_tokens.view(n, -1)
    best, pos = flat.topk(min(2 * k, flat.size(1)), dim=-1)
    row_sent = sent.repeat_interleave(rows)
    pieces, open_ = guide.next_pieces(tails, met, row_sent)  # (n * rows, C)
    c = pieces.size(1)
    piece_scores = beam_scores[:, :rows, None] + logp.gather(1, pieces).view(n, rows, c)
    piece_scores = piece_scores.masked_fill(~open_.view(n, rows, c), -math.inf)
    beams = torch.arange(rows, device=device)
    scores = torch.cat([best, cand[:, :, 0], piece_scores.view(n, -1)], 1)  # (n, M)
    origin = torch.cat(
        [
            pos // width,
            beams.expand(n, rows),
            beams[:, None].expand(rows, c).reshape(1, -1).expand(n, -1),
        ],
        1,
    )
    tokens = torch.cat(
        [flat_tokens.gather(1, pos), row_tokens.view(n, rows, width)[:, :, 0],
         pieces.view(n, -1)], 1
    )  # fmt: skip
    m = scores.size(1)
    # one of each (beam, token): sort the keys, drop the repeats
    index = torch.arange(m, device=device)
    key = torch.where(scores.isfinite(), origin * vocab + tokens, -1 - index)
    sorted_key, order = key.sort(dim=1)
    repeat = torch.zeros_like(sorted_key, dtype=torch.bool)
    repeat[:, 1:] = sorted_key[:, 1:] == sorted_key[:, :-1]
    scores = scores.masked_fill(repeat.scatter(1, order, repeat), -math.inf)
    # each candidate's state: its beam's tail and met constraints, one token on
    rows_of = torch.arange(n, device=device)[:, None] * rows + origin  # (n, M)
    w = tails.size(1)
    new_tails = torch.cat([tails[rows_of][..., 1:], tokens[..., None]], -1)
    flat_sent = sent[:, None].expand(n, m).reshape(-1)
    flat_tails = new_tails.view(-1, w)
    new_met = met[rows_of] | _match(
        flat_tails, guide.full[flat_sent], guide.full_valid[flat_sent]
    ).view(n, m, -1)
    progress = guide.progress(flat_tails, flat_sent).view(n, m, -1)
    bank = guide.bank(new_met.view(n * m, -1), progress.view(n * m, -1), flat_sent)
    bank = bank.view(n, m)
    # banks: fullest first, by score within each (stable sorts)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    by_bank = bank.gather(1, by_score).argsort(dim=1, descending=True, stable=True)
    order = by_score.gather(1, by_bank)
    bank_sorted = bank.gather(1, order)
    starts = torch.ones_like(bank_sorted, dtype=torch.bool)
    starts[:, 1:] = bank_sorted[:, 1:] != bank_sorted[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values
    rank = index - first  # place within its bank
    stripe = (rank * (guide.total + 1) + (guide.total - bank_sorted)).double()
    stripe = stripe.masked_fill(~scores.gather(1, order).isfinite(), math.inf)
    take = order.gather(1, stripe.argsort(dim=1, stable=True))
    if m < 2 * k:  # tiny vocabularies: pad with impossible candidates
        take = F.pad(take, (0, 2 * k - m), value=0)
    take = take[:, : 2 * k]
    picked_scores = scores.gather(1, take)
    if m < 2 * k:
        picked_scores[:, m:] = -math.inf
    rows_idx = torch.arange(n, device=device)[:, None]
    return (
        picked_scores,
        origin.gather(1, take),
        tokens.gather(1, take),
        new_tails[rows_idx, take],
        new_met[rows_idx, take],
    )


@torch.no_grad()
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
    guide = _guide(controls, batch, model.cfg.tgt_vocab_size, device)
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
            top_scores, origin, top_tokens, cand_tails, cand_met = _allocate(
                logp, beam_scores, rows, k, guide, sent, tails, met
            )
            unmet = guide.unmet(cand_met[:, :k])
        else:
            # a sentence's best 2K candidates are among the best 2K of each row
            width = min(2 * k, logp.size(-1))
            row_scores, row_tokens = logp.topk(width, dim=-1)  # (n * rows, W)
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
