"""A run's checkpoints: rank 0 writes, every rank hands in its RNG state, weights
that are not finite are never written; and resuming from one."""

from __future__ import annotations

import io
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import (
    CheckpointError,
    atomic_save,
    checkpoint_config,
    saved_size,
    set_rng_state,
)
from transformer.config import Config
from transformer.files import free_bytes, link_or_copy, sync_folder
from transformer.state_dicts import non_finite_weights
from transformer.training.distributed import Distributed
from transformer.training.state import TrainingError, TrainState

log = logging.getLogger(__name__)


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=True)


# what a run writes into its folder; a fresh run refuses a folder holding its
# checkpoints (it would mix two runs: keep_last rotation, best.pt, averaging)
RUN_CHECKPOINTS = ("last.pt", "best.pt", "step_*.pt")
RUN_OUTPUTS = ("metrics.jsonl", "valid_hyps.txt", "curves.png", "config.yaml")
RUN_TOKENIZER = ("spm.model", "spm.src.model", "spm.tgt.model", "spm.json")


def _aside(path: Path) -> Path:
    """A free name beside ``path``: metrics.jsonl -> metrics.1.jsonl, .2, ..."""
    for n in range(1, 1_000_000):
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise TrainingError(f"{path.parent}: no free name to keep {path.name} aside")


def prepare_run_dir(
    run_dir: Path,
    overwrite: bool,
    drop_tokenizer: bool = False,
    protect: list[Path] = (),
) -> None:
    """Make ``run_dir`` ready for a fresh run (not a resumed one).

    A folder that holds another run's checkpoints is refused, unless
    ``overwrite`` deletes them (with the run's outputs and TensorBoard logs, and
    its SentencePiece model when ``drop_tokenizer``: one trained under other
    settings) first; a file in ``protect`` (the checkpoint a fine-tuning run
    starts from) is never deleted. Without ``overwrite``, an earlier attempt's
    ``metrics.jsonl`` and ``tensorboard/`` (a run that ended before its first
    checkpoint) are kept aside under the next free number. The corpus cache
    always stays: it is keyed by content and shared.
    """
    found = sorted(
        {p for pattern in RUN_CHECKPOINTS for p in run_dir.glob(pattern)},
        key=lambda p: p.name,
    )
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        resume = (
            "Resume it (without --no-resume, training.resume=auto), choose"
            if (run_dir / "last.pt").exists()
            else "Choose"
        )
        raise TrainingError(
            f"{run_dir} holds a previous run's checkpoints ({names}{more}): a new "
            f"run there would mix with it. {resume} another training.run_dir, or "
            "pass --overwrite (training.overwrite=true) to delete it first"
        )
    if not overwrite:
        for name in ("metrics.jsonl", "tensorboard"):
            if (run_dir / name).exists():
                aside = _aside(run_dir / name)
                (run_dir / name).rename(aside)
                log.warning(
                    "a new run: the earlier attempt's %s is now %s", name, aside
                )
        return
    patterns = RUN_CHECKPOINTS + RUN_OUTPUTS + ("tensorboard",)
    patterns += RUN_TOKENIZER if drop_tokenizer else ()
    doomed = sorted({p for pattern in patterns for p in run_dir.glob(pattern)})
    kept = {p.resolve() for p in protect if p.exists()}
    for path in doomed:
        if path.resolve() in kept:
            raise TrainingError(
                f"--overwrite would delete {path}, the checkpoint training.init_from "
                "starts from: copy it out of the run folder first"
            )
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if doomed:
        log.warning(
            "--overwrite: deleted the previous run in %s (%s)",
            run_dir,
            ", ".join(p.name for p in doomed[:6]) + (" ..." if len(doomed) > 6 else ""),
        )


class NoRoom(TrainingError):
    """A checkpoint does not fit the run folder's filesystem."""


class Checkpointer:
    """``last.pt``, ``best.pt`` and the last ``keep_last`` ``step_<N>.pt`` of a run.

    A save writes ``last.pt`` (a temporary file renamed into place) and then
    gives the same bytes the names ``best.pt`` and ``step_<N>.pt`` asked for, as
    hard links where the filesystem allows (copies otherwise): one file's space
    and time a save, and never a step checkpoint newer than ``last.pt``. Before
    writing, the free space of the folder is compared with the checkpoint's
    size; when it does not fit, the step checkpoints that ``keep_last`` would
    drop after this save are dropped first, and if that is not enough the run
    stops (``NoRoom``) with ``last.pt`` as it was.
    """

    def __init__(self, run_dir: Path, ranks: Distributed, keep_last: int) -> None:
        self.run_dir, self.ranks, self.keep_last = run_dir, ranks, keep_last
        self.last_written: tuple[Path, int] | None = None  # (path, step)
        self.failed: str | None = None  # why a write failed: no more are tried
        if ranks.main:
            self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete the temporary files of writes that a kill cut short (a
        checkpoint's is as large as the checkpoint). Safe: the run holds the
        folder's lock, so no other process writes there."""
        for temp in self.run_dir.glob(".*.tmp"):
            temp.unlink(missing_ok=True)
            log.warning("removed %s, left by a write that was cut short", temp)

    def save(
        self, state: dict[str, Any], also: list[str] = (), every_rank: bool = True
    ) -> Path | None:
        """Write ``state`` as ``last.pt`` and under the names ``also`` (on rank
        0); returns its path, or None when nothing was written (non-finite
        weights). A write that fails ends every rank with one line.

        ``every_rank``: all ranks call this at the same point, so that each rank's
        RNG state is saved (``rng_per_rank``) and each learns how the write went;
        otherwise only this rank's RNG state is saved.
        """
        rngs = None
        if every_rank:  # as bytes: the gather's unpickler rejects tensors
            blobs = self.ranks.gather_to_main(_to_bytes(state["rng"]))
            rngs = None if blobs is None else [_from_bytes(b) for b in blobs]

        def write() -> str | None:
            return self._write(state, list(also), rngs)

        try:
            if every_rank:
                written = self.ranks.on_main(write, "writing a checkpoint")
            else:
                written = write() if self.ranks.main else None
        except (TrainingError, OSError) as e:
            self.failed = str(e)
            raise
        if written is None:
            return None
        self.last_written = (Path(written), state["step"])
        return Path(written)

    def _write(
        self, state: dict[str, Any], also: list[str], rngs: list | None
    ) -> str | None:
        last = self.run_dir / "last.pt"
        bad = non_finite_weights(state["model"])
        if bad:
            log.error(
                "not writing %s: %d weight tensor(s) are not finite (%s)",
                ", ".join(str(self.run_dir / n) for n in ["last.pt", *also]),
                len(bad),
                ", ".join(bad[:3]),
            )
            return None
        if rngs is not None and len(rngs) == self.ranks.world:
            state = {**state, "rng_per_rank": rngs}
        needed = saved_size(state)
        steps = [n for n in also if _STEP.fullmatch(n)]
        self._make_room(needed, steps)
        try:
            atomic_save(state, last)
            self.last_written = (last, state["step"])
            for name in also:
                link_or_copy(last, self.run_dir / name)
            sync_folder(self.run_dir)
        except OSError as e:
            raise TrainingError(
                f"cannot write {e.filename or last}: {e.strerror or e} (a checkpoint "
                f"of about {needed:,} bytes; {free_bytes(self.run_dir):,} free); "
                f"{self.describe_last()}"
            ) from None
        if steps:
            for old in self._steps()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return str(last)

    def _steps(self) -> list[Path]:
        """The step checkpoints, oldest first."""
        found = [p for p in self.run_dir.glob("step_*.pt") if _STEP.fullmatch(p.name)]
        return sorted(found, key=lambda p: _step_of(p.name))

    def _make_room(self, needed: int, new_steps: list[str]) -> None:
        """Check that ``needed`` bytes fit; if not, drop early the step
        checkpoints that ``keep_last`` drops after a save adding ``new_steps``
        (where that frees their bytes); if still not, stop the run."""
        free = before = free_bytes(self.run_dir)
        if needed <= free:
            return
        dropped = []
        if new_steps:
            after = {_step_of(n) for n in new_steps} | {
                _step_of(p.name) for p in self._steps()
            }
            drop = sorted(after)[: max(0, len(after) - self.keep_last)]
            for old in (self.run_dir / f"step_{n}.pt" for n in drop):
                if needed <= free:
                    break
                if old.exists() and old.stat().st_nlink == 1:  # not also best/last
                    old.unlink()
                    dropped.append(old.name)
                    free = free_bytes(self.run_dir)
        if needed <= free:
            log.warning(
                "%s: a checkpoint needs about %s bytes, %s were free: dropped %s "
                "early (training.keep_last=%d)",
                self.run_dir,
                f"{needed:,}",
                f"{before:,}",
                ", ".join(dropped),
                self.keep_last,
            )
            return
        raise NoRoom(
            f"{self.run_dir}: no room for a checkpoint: about {needed:,} bytes "
            f"needed, {free:,} free; the run stops: {self.describe_last()}"
        )

    def describe_last(self) -> str:
        """Where the newest checkpoint with finite weights is, for messages."""
        if self.last_written is not None:
            path, step = self.last_written
            return f"the last checkpoint with finite weights is {path} (step {step})"
        last = self.run_dir / "last.pt"
        if last.exists():
            return f"{last} is unchanged"
        return "no checkpoint was written"


_STEP = re.compile(r"step_(\d+)\.pt")


def _step_of(name: str) -> int:
    return int(_STEP.fullmatch(name)[1])


def restore(
    ckpt: dict[str, Any],
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> TrainState:
    """Load weights, optimizer, schedule and scaler; return the run's state."""
    missing = [k for k in ("optimizer", "scheduler", "scaler") if k not in ckpt]
    if missing:  # e.g. transformer-average's output put in place of last.pt
        raise CheckpointError(
            f"{path}: holds weights without a training state (no "
            f"{', '.join(missing)}): a run cannot resume from it; start a new run "
            f"from its weights with training.init_from={path} in another run_dir"
        )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot resume: {e}") from e
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    return TrainState.from_checkpoint(ckpt)


def restore_rng(
    ckpt: dict[str, Any],
    path: Path,
    ranks: Distributed,
    device: torch.device,
    seed: int,
) -> None:
    """This rank's own RNG state; a rank the checkpoint has none for (an older
    checkpoint, another world size) is seeded afresh, with a warning."""
    rngs = ckpt.get("rng_per_rank")
    if rngs is not None and len(rngs) == ranks.world:
        set_rng_state(rngs[ranks.rank], device)
        return
    set_rng_state(ckpt["rng"], device)
    if not ranks.main:
        torch.manual_seed(seed + 7919 * ranks.rank)
        log.warning(
            "%s holds no RNG state for rank %d of %d: seeded afresh, so this "
            "resume is not bit-identical to an uninterrupted run",
            path,
            ranks.rank,
            ranks.world,
        )


def check_lr_meaning(ckpt: dict[str, Any], cfg: Config, path: Path) -> None:
    """Format 1 read noam's training.lr as a scale factor; now it is the peak."""
    if ckpt.get("format", 1) >= 2 or cfg.training.schedule != "noam":
        return
    stored = ckpt["config"]["training"]["lr"]
    peak = checkpoint_config(ckpt, path).training.lr
    if math.isclose(cfg.training.lr, stored) and not math.isclose(stored, peak):
        raise CheckpointError(
            f"{path}: saved when noam's training.lr was a scale factor "
            f"({stored:g}); training.lr is now the peak rate: pass "
            f"training.lr={peak:.6g} to resume on the same schedule"
        )
