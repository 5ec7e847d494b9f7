"""What per-sentence controls do to a search step (``transformer.controls``'s
``PieceControls`` as tensors): a forced target prefix, banned continuations for
forbidden phrases, and required phrases met by dynamic beam allocation (Post &
Vilar 2018, vectorized as Hu et al. 2019).

``search.py`` and ``beam.py`` drive the loops and ask the ``Guide`` of a batch
what each step may take; ``allocate`` is beam search's candidate order under
constraints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.config import EOS_ID, PAD_ID
from transformer.controls import PieceControls


def right_aligned(
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


def match(tails: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Do the tails (m, W) end with the phrases ``ids`` (m, ..., w), w <= W, at
    their ``valid`` positions? (m, ...) bool; an empty phrase always does."""
    w = ids.size(-1)
    tail = tails[:, tails.size(1) - w :]  # (m, w): the last w tokens
    shape = (tails.size(0),) + (1,) * (ids.dim() - 2) + (w,)
    return ((tail.view(shape) == ids) | ~valid).all(-1)


class Guide:
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
        self.forbid, self.forbid_valid, self.forbid_real = right_aligned(
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
        self.full, self.full_valid, real = right_aligned(
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
            hit = match(tails, self.forbid[sent], self.forbid_valid[sent])
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
            met = met | match(tails, self.full[sent], self.full_valid[sent])
        return tails, met

    def progress(self, tails: Tensor, sent: Tensor) -> Tensor:
        """(m, C): the longest beginning of each constraint the tail ends with."""
        if self.begin.size(-1) == 0:
            return torch.zeros_like(self.c_len[sent])
        hit = match(tails, self.begin[sent], self.begin_valid[sent])  # (m, C, K)
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


def guide_of(
    controls: Sequence[PieceControls | None] | None, batch: int, vocab: int, device
) -> Guide | None:
    """The guide of a batch's controls; None when no sentence has any."""
    if controls is None or all(c is None or c.empty for c in controls):
        return None
    if len(controls) != batch:
        raise ValueError(f"{len(controls)} controls for {batch} sentences")
    return Guide(controls, vocab, device)


def bits(mask: int) -> tuple[int, ...]:
    return tuple(b for b in range(mask.bit_length()) if mask >> b & 1)


def allocate(
    logp: Tensor,
    beam_scores: Tensor,
    rows: int,
    k: int,
    guide: Guide,
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
    new_met = met[rows_of] | match(
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
