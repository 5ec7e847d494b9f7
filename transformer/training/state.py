"""The mutable state of a run, and what its data position depends on."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformer.checkpoint import CheckpointError
from transformer.config import Config
from transformer.data.store import legacy_store_key
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one update did, the same on every rank."""

    loss: float  # per target token over all ranks (not finite when skipped)
    tokens: int  # target tokens over all ranks
    grad_norm: float  # of the per-token gradient, before clipping
    skipped: bool  # a non-finite loss or gradient: no rank updated
    stop: bool  # a rank was asked to stop: every rank stops after this step
    out_of_time: bool = False  # training.max_minutes spent: validate, save, stop


class TrainingError(RuntimeError):
    """Training cannot go on (for example, every update keeps being non-finite)."""


@dataclass
class TrainState:
    """What changes from update to update, beside the weights and the optimizer."""

    step: int = 0  # updates applied
    epoch: int = 0  # the data position: the next batch is ``batch_in_epoch`` of
    batch_in_epoch: int = 0  # ``epoch`` (batches of skipped updates count too)
    best_score: float | None = None
    bad_validations: int = 0  # validations in a row without a new best
    # wall-clock seconds spent on updates (data included; validation and
    # checkpoint writes not), over every sitting of the run
    train_seconds: float = 0.0

    def record_score(self, score: float, higher_is_better: bool) -> bool:
        """Count a validation score; True when it is the best so far."""
        best = self.best_score
        better = best is None or (score > best if higher_is_better else score < best)
        if better:
            self.best_score, self.bad_validations = score, 0
        else:
            self.bad_validations += 1
        return better

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        return cls(**{k: ckpt[k] for k in cls.__dataclass_fields__ if k in ckpt})


def data_signature(cfg: Config, world: int, corpus: str) -> dict[str, Any]:
    """Everything the meaning of a saved (epoch, batch) position depends on.

    Args:
        corpus: a fingerprint of the tokenized, filtered training corpora (their
            stores) and their weights.
    """
    d, t = cfg.data, cfg.training
    return {
        "data.max_tokens": d.max_tokens,
        "data.max_sentences": d.max_sentences,
        "training.accumulate": t.accumulate,
        "training.seed": t.seed,
        "world size": world,
        "training corpus": corpus,
    }


def legacy_signature(
    saved: dict[str, Any] | None,
    current: dict[str, Any],
    cfg: Config,
    tokenizer: Tokenizer,
) -> dict[str, Any] | None:
    """A checkpoint written before corpus keys followed content names its corpus
    by the files' path, size and time: when those still match, it is today's
    corpus, and the data position resumes as before."""
    corpus = "training corpus"
    if saved is None or saved.get(corpus) == current[corpus]:
        return saved
    old = "+".join(
        f"{legacy_store_key(d, split, tokenizer, cfg.training.seed)}x{w:g}"
        for d, split, w in cfg.data.train_corpora()
    )
    if saved.get(corpus) != old:
        return saved
    log.info("a checkpoint from before content keys: its corpus files are unchanged")
    return {**saved, corpus: current[corpus]}


def check_data_position(
    state: TrainState,
    saved: dict[str, Any] | None,
    current: dict[str, Any],
    policy: str,
    path: Path,
) -> None:
    """Refuse to resume a data position whose meaning changed, or (``policy``
    ``next_epoch``) move it to the start of the next epoch and say so."""
    if saved is None:
        log.warning(
            "%s predates data-position checks: resuming at epoch %d, batch %d "
            "without checking batching settings or corpus",
            path,
            state.epoch,
            state.batch_in_epoch,
        )
        return
    changed = [
        f"{key} {saved.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if saved.get(key) != value
    ]
    if not changed:
        return
    what = "; ".join(changed)
    if policy != "next_epoch":
        raise CheckpointError(
            f"{path}: cannot resume the data position (epoch {state.epoch}, batch "
            f"{state.batch_in_epoch}): changed since the checkpoint: {what}. Restore "
            "the setting, or pass --allow-data-change "
            "(training.on_data_change=next_epoch) to continue from the next epoch"
        )
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    log.warning(
        "changed since the checkpoint: %s; the data position restarts at the "
        "beginning of epoch %d",
        what,
        state.epoch,
    )
