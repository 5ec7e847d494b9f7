"""Scoring given translations: the log-probability a model (or an ensemble)
gives a target sentence after a source, teacher-forced, in token batches.

A pair's score is the sum of the log-probabilities of its target pieces and
</s>, each after the pieces before it, from the same ``decode`` the search runs:
an ensemble's is the log of the models' mean probability. It is the score the
search gives that output with ``length_penalty: 0`` (and no ``unk_penalty``),
and minus the teacher-forced loss of training without label smoothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from transformer.config import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)


@dataclass
class PairScore:
    """One pair's score, or why it has none.

    Args:
        total: log-probability of the target's pieces and </s>.
        pieces: how many (the target's pieces and </s>).
        tokens: each one's log-probability, </s> last (when asked for).
        error: why the pair could not be scored (then the rest is empty).
    """

    total: float = float("nan")
    pieces: int = 0
    tokens: list[float] | None = None
    error: str | None = None

    @property
    def average(self) -> float:
        """Log-probability per piece (</s> included)."""
        return self.total / self.pieces if self.pieces else float("nan")


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    sources: list[list[int]],
    targets: list[list[int]],
    device: torch.device,
    max_tokens: int,
    bos: int = BOS_ID,
    per_token: bool = False,
    progress: bool = False,
) -> list[PairScore]:
    """Teacher-forced log-probabilities of ``targets`` (pieces, no </s>) after
    ``sources`` (pieces, no </s>, a source tag first where the model has one).

    Pairs go in length-sorted batches of at most ``max_tokens`` tokens (the
    longer side, padding included); results come back in input order. A pair
    whose target does not fit the model's target positions is not scored
    (``PairScore.error``).
    """
    from tqdm import tqdm

    from transformer.data import pad_sources, token_batches

    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    out: list[PairScore | None] = [None] * len(sources)
    if not sources:
        return []
    src_len = [len(s) + 1 for s in sources]
    tgt_len = [len(t) + 1 for t in targets]
    budget = max(max_tokens, max(src_len), max(tgt_len))
    was_training = model.training
    model.eval()
    with tqdm(total=len(sources), disable=not progress, desc="scoring") as bar:
        for batch in token_batches(src_len, tgt_len, budget):
            indices = batch.tolist()
            src = pad_sources([sources[i] for i in indices]).to(device)
            room = model.target_positions(src).tolist()  # (B,) positions each
            fits = [i for i, r in zip(indices, room, strict=True) if tgt_len[i] <= r]
            for i, r in zip(indices, room, strict=True):
                if tgt_len[i] > r:
                    out[i] = PairScore(
                        error=f"the target's {tgt_len[i]} tokens (with </s>) "
                        f"exceed the {r} target positions the model has for it"
                    )
            if fits:
                if len(fits) < len(indices):
                    src = pad_sources([sources[i] for i in fits]).to(device)
                for i, score in zip(
                    fits,
                    _score_batch(
                        model, src, [targets[i] for i in fits], bos, per_token
                    ),
                    strict=True,
                ):
                    out[i] = score
            bar.update(len(indices))
    model.train(was_training)
    return out


def _score_batch(
    model: nn.Module,
    src: torch.Tensor,
    targets: list[list[int]],
    bos: int,
    per_token: bool,
) -> list[PairScore]:
    """src (B, S); targets: B lists of pieces -> their scores."""
    width = max(len(t) for t in targets) + 1
    tgt_in = np.full((len(targets), width), PAD_ID, dtype=np.int64)
    tgt_out = np.full((len(targets), width), PAD_ID, dtype=np.int64)
    for row, t in enumerate(targets):
        tgt_in[row, : len(t) + 1] = [bos, *t]
        tgt_out[row, : len(t) + 1] = [*t, EOS_ID]
    tgt_in_t = torch.from_numpy(tgt_in).to(src.device)
    tgt_out_t = torch.from_numpy(tgt_out).to(src.device)
    # the model's decode, as the search calls it: an ensemble's is already the
    # log of its mean probability, which log_softmax leaves as it is
    memory = model.encode(src)
    logits = model.decode(tgt_in_t, memory)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(2, tgt_out_t[..., None]).squeeze(-1)  # (B, T)
    real = tgt_out_t != PAD_ID
    picked = torch.where(real, picked, 0.0)
    totals = picked.sum(1).tolist()
    rows = picked.tolist() if per_token else None
    return [
        PairScore(
            total,
            len(t) + 1,
            rows[b][: len(t) + 1] if rows is not None else None,
        )
        for b, (t, total) in enumerate(zip(targets, totals, strict=True))
    ]
