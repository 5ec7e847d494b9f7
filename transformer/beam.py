"""Beam search over the KV cache (``decoding.strategy: beam``; ``search.generate``
calls it), with the step of ``transformer.stepper``. Finished hypotheses stay on
the device until the batch is done; required phrases are met by dynamic beam
allocation (``transformer.guide.allocate``, described in ``transformer.search``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import BOS_ID, EOS_ID, DecodingConfig
from transformer.controls import PieceControls
from transformer.guide import allocate, bits, guide_of
from transformer.stepper import (
    Hypothesis,
    Stepper,
    apply_bans,
    force_eos,
    limit_range,
    max_lengths,
    prime_prefix,
)

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
    equal values is unspecified too. Faster than ``topk`` on a vocabulary's
    width (the benchmarks page).
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
    shortest, longest = limit_range(limit_all, cfg.min_len)
    # the penalty at each length limit bounds what a live beam can still reach
    # (alpha <= 0: the raw score does); computed in Python as for finished ones
    limit_penalty = torch.tensor(
        [length_penalty(n, alpha) if alpha > 0 else 1.0 for n in range(longest + 1)],
        dtype=torch.float64,
        device=device,
    )
    stepper = Stepper(model, model.encode(src), use_cache, cfg.compile)
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
            prefix_scores, pending = prime_prefix(stepper, guide, bos, cfg)
            beam_scores[:, 0] = prefix_scores
            beam_tokens = guide.prefix[:, None, :first].expand(-1, k, -1)
    for step in range(first, longest):
        n = sent.numel()
        limit = limit_all[sent]  # (n,)
        raw = stepper.step(tokens) if pending is None else pending
        pending = None
        logp = apply_bans(raw, step, cfg, banned)
        if guide is not None:
            row_sent = sent.repeat_interleave(rows_per_sentence)
            forced = guide.forced(logp, row_sent, step)
            guide.ban(logp, row_sent, tails, met, step)
        force_eos(
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
            # what the step uses, the best K candidates and the best K that do
            # not end (among the best 2K: a row ends with one token only), are
            # among each row's best K + 1
            width = min(k + 1, logp.size(-1))
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
