"""The training loop: one update at a time, every decision taken by all ranks.

Each update all-reduces one small tensor (loss sum, target tokens, non-finite
flags, stop flag) before the optimizer step, so that every rank skips a
non-finite update together and stops together at the same step boundary. The
commit of an update and every checkpoint write are critical sections
(``signals``), so a saved state is always the state after a whole step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import FORMAT_VERSION, rng_state
from transformer.config import Config
from transformer.data import Batch
from transformer.data.readers import check_split
from transformer.data.workers import worker_failure
from transformer.inductor_cpu import vectorize_bool_masks
from transformer.models import count_parameters
from transformer.precision import effective_precision
from transformer.training.build import (
    build_device,
    build_model,
    build_train_data,
    run_dir_of,
)
from transformer.training.checkpointing import Checkpointer, restore, restore_rng
from transformer.training.distributed import Distributed
from transformer.training.ema import build_ema
from transformer.training.loss import forward_loss_and_grad
from transformer.training.optim import build_optimizer
from transformer.training.progress import MetricsLog, Progress
from transformer.training.runlock import lock_run_dir
from transformer.training.signals import StopSignals
from transformer.training.start import start_run, with_corpus
from transformer.training.state import (
    StepResult,
    TrainingError,
    TrainState,
    check_data_position,
    data_signature,
    legacy_signature,
)
from transformer.training.validation import load_valid, validate

log = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimizer, data position and run directory of one run."""

    def __init__(self, config: Config, resume: bool | None = None) -> None:
        t = config.training
        self.dist = Distributed.from_env()
        self.device = build_device(t, self.dist)
        self.dist.init(self.device, t.dist_timeout, t.prepare_timeout)
        self.run_dir = run_dir_of(config)
        self.lock = lock_run_dir(self.run_dir, self.dist)

        config = self.dist.main_first(
            lambda: with_corpus(config, self.run_dir), "downloading the corpus"
        )
        check_split(config.data, config.data.valid_split, "data.valid_split")
        run = start_run(config, self.run_dir, resume, self.dist)
        # the resolved config: download folder, corpus cache, vocabulary sizes
        self.cfg = cfg = run.config
        t = cfg.training
        ckpt, last, init, self.tokenizer = run.ckpt, run.last, run.init, run.tokenizer

        self.model, self.train_model = build_model(cfg, self.device, self.dist)
        if init is not None:
            init.load_into(self.model)
            del init  # its weights are in the model now
        # bf16 without native bf16 runs fp32 (with a warning), never emulated
        self.precision = effective_precision(
            self.device, t.precision, "training.precision"
        )
        self._objective = forward_loss_and_grad
        if t.compile:
            vectorize_bool_masks()
            self._objective = torch.compile(forward_loss_and_grad)
        self.optimizer, self.scheduler, self.scaler = build_optimizer(
            cfg, self.model, self.device
        )
        self.train_data = build_train_data(cfg, self.tokenizer, self.dist, self.device)
        self.n_train = self.train_data.n_pairs
        self.valid = load_valid(cfg, self.tokenizer) if self.dist.main else None
        self.signature = data_signature(
            cfg, self.dist.world, self.train_data.fingerprint()
        )
        self.state = TrainState()
        self.checkpoints = Checkpointer(self.run_dir, self.dist, t.keep_last)
        self.signals = StopSignals()
        self._last_saved_at = -1  # step of the newest last.pt (every rank knows)
        self._metrics: MetricsLog | None = None
        if ckpt is not None:
            self.state = restore(
                ckpt, last, self.model, self.optimizer, self.scheduler, self.scaler
            )
            self._last_saved_at = self.state.step
            self.checkpoints.last_written = (last, self.state.step)
            check_data_position(
                self.state,
                legacy_signature(
                    ckpt.get("data_signature"), self.signature, cfg, self.tokenizer
                ),
                self.signature,
                t.on_data_change,
                last,
            )
            restore_rng(ckpt, last, self.dist, self.device, t.seed)
            log.info("resumed from %s at step %d", last, self.state.step)
        self.ema = build_ema(self.model, t.ema_decay, t.ema_decay_warmup, ckpt, last)
        self._rng = rng_state(self.device)  # the RNG state at the last step boundary
        log.info(
            "model: %s parameters; device %s; %d training pairs; padding "
            "efficiency %.3f (epoch %d)",
            f"{count_parameters(self.model):,}",
            self.device,
            self.n_train,
            # the epoch the run continues in: its batches are kept for the stream
            self.train_data.efficiency(self.state.epoch),
            self.state.epoch,
        )

    @property
    def step(self) -> int:
        return self.state.step

    # --- checkpoints ---

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs, as of the last step boundary."""
        return {
            "format": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._rng,
            **self.state.to_dict(),
            "data_signature": self.signature,
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.state_dict(),
            **({} if self.ema is None else self.ema.checkpoint_entries()),
        }

    def _save(
        self, best: bool = False, step: bool = False, every_rank: bool = True
    ) -> None:
        """Write ``last.pt``, also as ``best.pt`` and as ``step_<N>.pt`` (under
        ``keep_last``) when asked; call on every rank together."""
        with self.signals.critical():
            state = self.checkpoint_state()
            also = ["best.pt"] if best else []
            if step and self.cfg.training.keep_last:
                also.append(f"step_{self.state.step}.pt")
            self.checkpoints.save(state, also, every_rank)
            self._last_saved_at = self.state.step

    # --- one update ---

    def _forward_loss(
        self, batch: Batch, grad_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The summed loss of one batch (on the device), its logits and the
        gradient of ``grad_scale`` x the loss with respect to them
        (``forward_loss_and_grad``); compiled with ``training.compile``, where
        batch sizes and lengths are dynamic."""
        t = self.cfg.training
        ids = (batch.src, batch.tgt_in, batch.tgt_out)
        if t.compile:
            for x in ids:
                torch._dynamo.maybe_mark_dynamic(x, [0, 1])
        return self._objective(
            self.train_model,
            *ids,
            self.device,
            self.precision,
            t.label_smoothing,
            t.loss_chunk_rows,
            grad_scale,
        )

    def train_step(
        self, batches: list[Batch], position: tuple[int, int] | None = None
    ) -> StepResult:
        """One update from ``batches`` (the gradient of their union, over all
        ranks), or none on any rank when a loss or gradient is not finite.

        Args:
            position: the data position (epoch, next batch) once this step is done.
        """
        t = self.cfg.training
        tokens = sum(b.n_tokens for b in batches)
        # Gradients of summed losses / budget. Ranks do not know the global token
        # count before the all-reduce below, so under DDP they share a fixed
        # budget and the exact per-token normalisation comes after it.
        budget = tokens if not self.dist.enabled else self.cfg.data.max_tokens
        budget *= 1 if not self.dist.enabled else t.accumulate
        scale = self.dist.world / budget  # DDP averages over ranks: undo that
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        # the loss's gradient is written times this (fp16: and the loss scale)
        grad_scale = self.scaler.scale(
            torch.tensor(scale, dtype=torch.float32, device=self.device)
        )
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            sync = contextlib.nullcontext()
            if self.dist.enabled and i < len(batches) - 1:
                sync = self.train_model.no_sync()
            with sync:
                loss, logits, grad = self._forward_loss(batch, grad_scale)
                torch.autograd.backward(logits, grad)
                del logits, grad
            total += loss
        self.scaler.unscale_(self.optimizer)  # fp16 only
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).to(torch.float64)
        extra = [float(tokens), float(self.signals.requested), float(self._timed_out())]
        packed = torch.cat(
            [
                torch.stack(
                    [total, norm, ~total.isfinite(), ~norm.isfinite()]
                ).double(),
                torch.tensor(extra, dtype=torch.float64, device=self.device),
            ]
        )
        loss_sum, norm_sum, bad_loss, bad_grad, n_tokens, stop, late = self.dist.sum(
            packed
        ).tolist()  # the one host sync of the step
        skipped = bool(bad_loss or bad_grad)
        grad_norm = norm_sum / self.dist.world * budget / max(n_tokens, 1.0)
        with self.signals.critical():
            if skipped:
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler.is_enabled():
                    self.scaler.update()  # an fp16 overflow: a smaller scale next
            else:
                factor = budget / n_tokens
                if t.clip_grad_norm > 0:
                    factor *= min(1.0, t.clip_grad_norm / (grad_norm + 1e-6))
                if factor != 1.0:
                    torch._foreach_mul_(grads, factor)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update()
                self.state.step += 1
            if position is not None:
                self.state.epoch, self.state.batch_in_epoch = position
            self._rng = rng_state(self.device)
        return StepResult(
            loss_sum / max(n_tokens, 1.0),
            int(n_tokens),
            grad_norm,
            skipped,
            bool(stop),
            bool(late),
        )

    def _timed_out(self) -> bool:
        """``training.max_minutes`` spent, by rank 0's clock (the all-reduce
        tells the other ranks, so that they stop at the same step)."""
        limit = self.cfg.training.max_minutes
        return bool(limit) and self.dist.main and self.state.train_seconds >= 60 * limit

    # --- the loop ---

    def _batches(self) -> Iterator[tuple[int, int, Batch]]:
        """Yield (epoch, index in epoch, batch) from the saved position on."""
        return self.train_data.stream(
            self.state.epoch, self.state.batch_in_epoch, self.cfg.training.max_epochs
        )

    def train(self) -> Path:
        """Run until max_steps, max_epochs, early stopping, a stop signal on any
        rank, or ``max_nonfinite`` skipped updates in a row (TrainingError); the
        run folder's lock is released at the end, also after an error."""
        t = self.cfg.training
        self._metrics = MetricsLog(self.run_dir, self.dist.main, t.tensorboard)
        progress = Progress(t.max_steps, self.state.step, self.dist.main, t.log_seconds)
        self.signals.install()
        together = False  # did every rank leave the loop at the same step?
        try:
            failure = self._loop(progress)
            together = True
        except RuntimeError as e:  # a data worker failed or died: save, one line
            failure = worker_failure(e)
            if failure is None:
                raise
        finally:
            progress.close()
            try:
                self._save_at_exit(together)
            finally:
                self.signals.uninstall()
                try:
                    self._metrics.close(curves=self.state.step > 0)
                finally:
                    self.lock.release()
        if failure is not None:
            raise TrainingError(f"{failure}; {self.checkpoints.describe_last()}")
        best, last = self.run_dir / "best.pt", self.run_dir / "last.pt"
        if self.dist.main and not (best.exists() or last.exists()):
            why = (
                "it was stopped by a signal"
                if self.signals.requested
                else "see the errors above"  # e.g. every save refused: not finite
            )
            raise TrainingError(
                f"the run ended at step {self.state.step} without a checkpoint in "
                f"{self.run_dir} ({why})"
            )
        return best if best.exists() else last

    def _loop(self, progress: Progress) -> str | None:
        """The updates; returns why the run failed, or None."""
        t = self.cfg.training
        pending: list[Batch] = []
        skipped_in_row = 0
        window_tokens, window_start = 0, time.perf_counter()
        clock = time.perf_counter()  # state.train_seconds counts from here
        self.model.train()
        for epoch, index, batch in self._batches():
            if self.state.step >= t.max_steps:
                break
            pending.append(batch)
            if len(pending) < t.accumulate:
                continue
            result = self.train_step(pending, position=(epoch, index + 1))
            pending = []
            step = self.state.step
            now = time.perf_counter()
            self.state.train_seconds += now - clock
            clock = now
            if result.skipped:
                # an fp16 gradient overflow with a finite loss is the scaler's job
                if not (self.scaler.is_enabled() and math.isfinite(result.loss)):
                    skipped_in_row += 1
                what = "loss" if not math.isfinite(result.loss) else "gradient"
                log.warning(
                    "non-finite %s at step %d: update skipped on every rank",
                    what,
                    step + 1,
                )
                if skipped_in_row >= t.max_nonfinite:
                    return (
                        f"{skipped_in_row} non-finite updates in a row after step "
                        f"{step}; stopping"
                    )
            else:
                skipped_in_row = 0
                window_tokens += result.tokens
                values = {}
                if step % t.log_every == 0 or step == 1:
                    elapsed = time.perf_counter() - window_start
                    speed = window_tokens / max(elapsed, 1e-9)
                    lr = self.scheduler.get_last_lr()[0]
                    row = {"loss": result.loss, "lr": lr, "tokens_per_s": speed}
                    row["train_seconds"] = round(self.state.train_seconds, 2)
                    row |= {"grad_norm": result.grad_norm, "epoch": epoch}
                    self._metrics.record("train", step, row)
                    values = dict(
                        loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}"
                    )
                    window_tokens, window_start = 0, time.perf_counter()
                progress.update(step, **values)
            if result.stop:
                log.warning("stop requested: every rank stops after step %d", step)
                return None
            if result.skipped:
                continue
            validating = (
                step % t.validate_every == 0
                or step == t.max_steps
                or result.out_of_time
            )
            if t.save_every and step % t.save_every == 0 and not validating:
                self._save(step=True)  # (a validation saves the step itself)
            if result.out_of_time:
                log.info(
                    "training.max_minutes=%g spent after step %d", t.max_minutes, step
                )
            if validating:
                if self.validate_and_save() and not result.out_of_time:
                    log.info("early stopping at step %d", step)
                    return None
                window_start = clock = time.perf_counter()
                self.model.train()
            if result.out_of_time:
                return None
        return None

    def _save_at_exit(self, together: bool) -> None:
        if self.state.step == 0 or self._last_saved_at == self.state.step:
            return
        if self.checkpoints.failed:  # a full disk: last.pt stays as it was
            return
        if together:
            self._save()
        elif not self.dist.enabled:
            self._save(every_rank=False)  # the state of the last boundary
        else:
            log.warning(
                "rank %d stopped on its own: last.pt is not rewritten (%s)",
                self.dist.rank,
                self.checkpoints.describe_last(),
            )

    # --- validation ---

    def validate_and_save(self) -> bool:
        """Validate on rank 0, keep the best checkpoint, save; True = stop early."""
        t = self.cfg.training

        def run() -> dict[str, Any]:
            weights = contextlib.nullcontext()
            if t.validate_ema:  # the model holds the EMA weights while validating
                weights = self.ema.applied()
            with weights:
                return validate(
                    self.model,
                    self.valid,
                    self.tokenizer,
                    self.cfg,
                    self.device,
                    self.run_dir / "valid_hyps.txt",
                )

        metrics = self.dist.on_main(run, "validating")
        s = self.state
        better = s.record_score(metrics[t.best_metric], t.best_metric != "loss")
        if self._metrics is not None:
            row = {**metrics, "best": better, "train_seconds": s.train_seconds}
            self._metrics.record("valid", s.step, row)
        if self.dist.main:
            summary = ", ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)
            )
            log.info(
                "validation%s at step %d: %s%s",
                " of the EMA weights" if t.validate_ema else "",
                s.step,
                summary,
                " (best)" if better else "",
            )
            if "bleu_signature" in metrics:
                log.info("BLEU signature: %s", metrics["bleu_signature"])
        self._save(best=better, step=True)  # last.pt, best.pt and step_<N>.pt
        return bool(t.patience) and s.bad_validations >= t.patience


def train(cfg: Config, resume: bool | None = None) -> Path:
    """Train a model as configured; returns the path of the best checkpoint."""
    trainer = Trainer(cfg, resume)
    try:
        return trainer.train()
    finally:
        trainer.dist.close()
