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

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from transformer.beam import beam_search
from transformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DecodingConfig,
)
from transformer.controls import PieceControls
from transformer.guide import guide_of
from transformer.stepper import (
    Hypothesis,
    Stepper,
    apply_bans,
    check_min_len,
    force_eos,
    length_limits,
    limit_range,
    max_lengths,
    prime_prefix,
    warn_min_len_cut,
)

# the names other modules import from here
__all__ = [
    "Hypothesis",
    "check_min_len",
    "decode_corpus",
    "filter_logits",
    "generate",
    "length_limits",
    "max_lengths",
    "warn_min_len_cut",
]


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
    shortest, longest = limit_range(limit, cfg.min_len)
    stepper = Stepper(model, model.encode(src), use_cache, cfg.compile)
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
            prefix_scores, pending = prime_prefix(stepper, guide, bos, cfg)
            scores += prefix_scores
            out[:, :first] = guide.prefix[:, :first]
            tokens = guide.prefix[:, first - 1]
    for step in range(first, longest):
        raw = stepper.step(tokens) if pending is None else pending
        pending = None
        logp = apply_bans(raw, step, cfg, banned)
        if guide is not None:
            forced = guide.forced(logp, alive, step)
            guide.ban(logp, alive, tails, met, step)
        force_eos(logp, step, limit[alive], step >= shortest - 1)
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
