"""The training loop: smoothed loss, schedules, validation, checkpoints, resume, DDP."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from transformer.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    check_compatible,
    checkpoint_config,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from transformer.config import PAD_ID, Config, ConfigError, DecodingConfig, save_config
from transformer.data import (
    Batch,
    BatchIterator,
    ParallelCorpus,
    StreamingBatchIterator,
    collate,
    load_corpus,
    read_pairs,
    token_batches,
)
from transformer.evaluation import score_corpus
from transformer.model import Transformer, count_parameters
from transformer.search import decode_corpus
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (for example, the loss keeps being non-finite)."""


# --- pieces that tests use directly ---


def label_smoothed_loss(
    logits: torch.Tensor, target: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Summed cross-entropy against (1 - eps) one-hot + eps / V uniform, pads ignored.

    Args:
        logits: (B, T, V); target: (B, T) with ``PAD_ID`` where there is no token.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        target.flatten(),
        ignore_index=PAD_ID,
        label_smoothing=epsilon,
        reduction="sum",
    )


def lr_factor(step: int, cfg: Config) -> float:
    """Learning rate at update ``step`` (1-based).

    With ``cooldown_steps`` = C, updates past ``max_steps - C`` scale the schedule's
    rate linearly down to 1 / C at ``max_steps`` (warmup-stable-decay style). Earlier
    updates are unchanged, so a run resumed at ``max_steps - C`` with the cool-down
    switched on follows the same schedule as one started with it.
    """
    t = cfg.training
    step = max(step, 1)
    if t.schedule == "noam":
        # lr = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
        rate = (
            t.lr
            * cfg.model.d_model**-0.5
            * min(step**-0.5, step * t.warmup_steps**-1.5)
        )
    elif t.schedule == "inverse_sqrt":
        if t.warmup_steps and step < t.warmup_steps:
            rate = t.lr * step / t.warmup_steps
        else:
            rate = t.lr * math.sqrt(max(t.warmup_steps, 1) / step)
    else:
        rate = t.lr
    if t.cooldown_steps:
        rate *= min(1.0, max(t.max_steps - step + 1, 0) / t.cooldown_steps)
    return rate


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"training.device: {name!r} asked for but CUDA is not available"
        )
    return device


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def build_tokenizer(cfg: Config, run_dir: Path, dist_info: Distributed) -> Tokenizer:
    """Given model files, the run's own model, or one trained on the training data."""
    tcfg = cfg.data.tokenizer
    if tcfg.model or tcfg.src_model:
        return Tokenizer.from_files(tcfg)
    saved = run_dir / ("spm.model" if tcfg.joint else "spm.src.model")
    if not saved.exists() and dist_info.main:
        pairs = list(read_pairs(cfg.data, cfg.data.train_split, cfg.training.seed))
        tokenizer = Tokenizer.train(tcfg, [s for s, _ in pairs], [t for _, t in pairs])
        tokenizer.save(run_dir)
    dist_info.barrier()
    if tcfg.joint:
        return Tokenizer((run_dir / "spm.model").read_bytes())
    return Tokenizer(
        (run_dir / "spm.src.model").read_bytes(),
        (run_dir / "spm.tgt.model").read_bytes(),
    )


def set_vocab_sizes(cfg: Config, tokenizer: Tokenizer) -> None:
    for side, size in (
        ("src", tokenizer.src_vocab_size),
        ("tgt", tokenizer.tgt_vocab_size),
    ):
        name = f"{side}_vocab_size"
        current = getattr(cfg.model, name)
        if current and current != size:
            raise ConfigError(
                f"model.{name}: {current} but the tokenizer has {size} pieces "
                "(leave it at 0 to take the tokenizer's size)"
            )
        setattr(cfg.model, name, size)
    if not tokenizer.joint and cfg.model.tie_src_tgt_embeddings:
        raise ConfigError(
            "model.tie_src_tgt_embeddings: needs a joint tokenizer "
            "(data.tokenizer.joint: true)"
        )
    cfg.model.validate()


# --- the trainer ---


class Trainer:
    """Owns the model, optimizer, data position and run directory of one run."""

    def __init__(self, cfg: Config, resume: bool | None = None) -> None:
        self.cfg = cfg
        t = cfg.training
        self.dist = Distributed.from_env()
        if self.dist.enabled and not dist.is_initialized():
            backend = (
                "nccl" if torch.cuda.is_available() and t.device != "cpu" else "gloo"
            )
            dist.init_process_group(backend)
        self.device = resolve_device(t.device)
        if self.device.type == "cuda":
            if self.dist.enabled:
                self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if t.threads:
            torch.set_num_threads(t.threads)
        self.run_dir = Path(t.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.data.cache_dir is None:
            cfg.data.cache_dir = str(self.run_dir / "cache")

        resume = t.resume == "auto" if resume is None else resume
        last = self.run_dir / "last.pt"
        ckpt = load_checkpoint(last) if resume and last.exists() else None
        if ckpt is not None:
            self.tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
            saved = checkpoint_config(ckpt, last)
            set_vocab_sizes(cfg, self.tokenizer)
            check_compatible(saved.model, cfg.model, last)
        else:
            self.tokenizer = build_tokenizer(cfg, self.run_dir, self.dist)
            set_vocab_sizes(cfg, self.tokenizer)
        if self.dist.main:
            save_config(cfg, self.run_dir / "config.yaml")

        torch.manual_seed(t.seed)
        self.model = Transformer(cfg.model).to(self.device)
        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(
            self.model.parameters(),
            lr=1.0,  # the scheduler's factor is the learning rate
            betas=t.betas,
            eps=t.eps,
            weight_decay=t.weight_decay,
            **fused,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step + 1, cfg)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type,
            enabled=t.precision == "fp16" and self.device.type == "cuda",
        )

        self.step = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.best_score: float | None = None
        self.bad_validations = 0
        self.stop_requested = False
        self._writer = None

        self.train_data = self._train_batches()
        self.valid = load_corpus(
            cfg.data, cfg.data.valid_split, self.tokenizer, train=False, seed=t.seed
        )
        if ckpt is not None:
            self._restore(ckpt)
            log.info("resumed from %s at step %d", last, self.step)
        log.info(
            "model: %s parameters; device %s; %d training pairs",
            f"{count_parameters(self.model):,}",
            self.device,
            self.n_train,
        )

    def _train_batches(self) -> BatchIterator | StreamingBatchIterator:
        d, t = self.cfg.data, self.cfg.training
        if d.streaming:
            self.n_train = -1
            return StreamingBatchIterator(
                d, self.tokenizer, t.seed, self.dist.rank, self.dist.world
            )
        corpus = load_corpus(d, d.train_split, self.tokenizer, train=True, seed=t.seed)
        self.n_train = len(corpus)
        iterator = BatchIterator(
            corpus,
            d.max_tokens,
            d.max_sentences,
            t.seed,
            rank=self.dist.rank,
            world=self.dist.world,
        )
        log.info("padding efficiency: %.3f", iterator.efficiency(0))
        return iterator

    # --- checkpoints ---

    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_score": self.best_score,
            "bad_validations": self.bad_validations,
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.state_dict(),
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume: {e}") from e
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step = ckpt["step"]
        self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        self.best_score = ckpt["best_score"]
        self.bad_validations = ckpt["bad_validations"]

    def save(self, name: str) -> Path:
        path = self.run_dir / name
        if self.dist.main:
            atomic_save(self.state(), path)
        return path

    def _save_step_checkpoint(self) -> None:
        if not self.dist.main or not self.cfg.training.keep_last:
            return
        self.save(f"step_{self.step}.pt")
        steps = sorted(
            self.run_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1])
        )
        for old in steps[: -self.cfg.training.keep_last]:
            old.unlink(missing_ok=True)

    # --- metrics ---

    def _record(self, kind: str, values: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        row = {"type": kind, "step": self.step, "time": time.time(), **values}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{key}", value, self.step)

    def _open_tensorboard(self):
        if not (self.cfg.training.tensorboard and self.dist.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # --- the loop ---

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        with autocast(self.device, self.cfg.training.precision):
            logits = self.train_model(batch.src, batch.tgt_in)
        return label_smoothed_loss(
            logits, batch.tgt_out, self.cfg.training.label_smoothing
        )

    def train_step(self, batches: list[Batch]) -> tuple[float, int] | None:
        """One update from ``batches``; the gradient equals that of their union.

        Returns (loss per target token, target tokens), or None when skipped.
        """
        t = self.cfg.training
        tokens = sum(b.n_tokens for b in batches)
        if self.dist.enabled:
            # normalise by the global token count; DDP averages over ranks, undo that
            count = torch.tensor([tokens], dtype=torch.float64, device=self.device)
            dist.all_reduce(count)
            normaliser = count.item() / self.dist.world
        else:
            normaliser = tokens
        total = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and not last:
                sync = self.train_model.no_sync()
            with sync:
                loss = self._forward_loss(batch)
                self.scaler.scale(loss / normaliser).backward()
            total += loss.detach()
        loss_value = total.item() / tokens
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if t.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_value, tokens

    def _batches(self):
        """Yield (epoch, index in epoch, batch) from the saved position on."""
        epoch, start = self.epoch, self.batch_in_epoch
        max_epochs = self.cfg.training.max_epochs
        while not max_epochs or epoch < max_epochs:
            produced = False
            for i, batch in enumerate(self.train_data.epoch(epoch, start), start=start):
                produced = True
                yield epoch, i, batch
            if not produced and start == 0:
                raise TrainingError("the training data yields no batches")
            epoch, start = epoch + 1, 0

    def train(self) -> Path:
        """Run until max_steps, max_epochs, early stopping or a stop signal."""
        t = self.cfg.training
        self._writer = self._open_tensorboard()
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not self.dist.main,
            desc="training",
            unit="step",
            dynamic_ncols=True,
        )
        nonfinite = 0
        window_tokens, window_start = 0, time.perf_counter()
        pending: list[Batch] = []
        stopped_early = False
        try:
            self.model.train()
            for epoch, index, batch in self._batches():
                if self.step >= t.max_steps or self.stop_requested:
                    break
                pending.append(batch)
                if len(pending) < t.accumulate:
                    continue
                result = self.train_step(pending)
                pending = []
                self.epoch, self.batch_in_epoch = epoch, index + 1
                if result is None:
                    nonfinite += 1
                    log.warning(
                        "non-finite loss at step %d: update skipped", self.step + 1
                    )
                    if nonfinite >= t.max_nonfinite:
                        raise TrainingError(
                            f"{nonfinite} non-finite losses in a row at step "
                            f"{self.step}; stopping (the last good checkpoint is "
                            f"{self.run_dir}/last.pt)"
                        )
                    continue
                nonfinite = 0
                self.step += 1
                loss, tokens = result
                window_tokens += tokens
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == 1:
                    elapsed = time.perf_counter() - window_start
                    speed = window_tokens * self.dist.world / max(elapsed, 1e-9)
                    lr = self.scheduler.get_last_lr()[0]
                    bar.set_postfix(
                        loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}"
                    )
                    self._record(
                        "train",
                        {"loss": loss, "lr": lr, "tokens_per_s": speed, "epoch": epoch},
                    )
                    window_tokens, window_start = 0, time.perf_counter()
                if t.save_every and self.step % t.save_every == 0:
                    self._save_step_checkpoint()
                if self.step % t.validate_every == 0 or self.step == t.max_steps:
                    if self.validate_and_save():
                        stopped_early = True
                        break
                    window_start = time.perf_counter()
                    self.model.train()
            if self.stop_requested:
                log.warning("stop requested: saving %s/last.pt", self.run_dir)
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.step > 0:
                self.save("last.pt")
            if self._writer is not None:
                self._writer.close()
            if self.dist.main and self.step > 0:
                plot_metrics(self.run_dir)
        if stopped_early:
            log.info("early stopping at step %d", self.step)
        best = self.run_dir / "best.pt"
        return best if best.exists() else self.run_dir / "last.pt"

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_requested = True

    # --- validation ---

    @torch.no_grad()
    def evaluate_loss(self, corpus: ParallelCorpus) -> dict[str, float]:
        self.model.eval()
        loss_sum = correct = tokens = 0.0
        lengths = corpus.src_lengths()
        batches = token_batches(
            lengths, corpus.tgt_lengths(), self.cfg.data.valid_max_tokens
        )
        for indices in batches:
            batch = collate(
                [corpus.src[i] for i in indices], [corpus.tgt[i] for i in indices]
            )
            batch = batch.to(self.device)
            with autocast(self.device, self.cfg.training.precision):
                logits = self.model(batch.src, batch.tgt_in)
            # validation loss without smoothing: a real cross-entropy / perplexity
            loss_sum += label_smoothed_loss(logits, batch.tgt_out, 0.0).item()
            real = batch.tgt_out != PAD_ID
            correct += ((logits.argmax(-1) == batch.tgt_out) & real).sum().item()
            tokens += batch.n_tokens
        loss = loss_sum / tokens
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 50)),
            "accuracy": correct / tokens,
        }

    def validate(self) -> dict[str, Any]:
        """Validation loss, perplexity, accuracy and greedy BLEU / chrF."""
        metrics: dict[str, Any] = self.evaluate_loss(self.valid)
        if self.cfg.training.valid_bleu:
            greedy = DecodingConfig(
                strategy="greedy",
                max_len_a=self.cfg.decoding.max_len_a,
                max_len_b=self.cfg.decoding.max_len_b,
                max_tokens=self.cfg.decoding.max_tokens,
            )
            sources = [s[: self.cfg.model.max_positions - 1] for s in self.valid.src]
            with autocast(self.device, self.cfg.training.precision):
                results = decode_corpus(self.model, sources, greedy, self.device)
            hyps = [self.tokenizer.decode_tgt(r[0].tokens) for r in results]
            scores = score_corpus(hyps, self.valid.refs)
            metrics.update(scores)
            if self.dist.main:
                (self.run_dir / "valid_hyps.txt").write_text(
                    "\n".join(hyps) + "\n", encoding="utf-8"
                )
        return metrics

    def validate_and_save(self) -> bool:
        """Validate, keep the best checkpoint, save last.pt; True = stop early."""
        t = self.cfg.training
        metrics = self.validate() if self.dist.main else {}
        if self.dist.enabled:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)  # only rank 0 decodes
            metrics = box[0]
        key = t.best_metric
        if key not in metrics:
            raise ConfigError(
                f"training.best_metric: {key!r} is not computed "
                "(set training.valid_bleu: true for bleu/chrf)"
            )
        score = metrics[key]
        better = self.best_score is None or (
            score < self.best_score if key == "loss" else score > self.best_score
        )
        if better:
            self.best_score = score
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        self._record("valid", {**metrics, "best": better})
        summary = ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)
        )
        log.info(
            "validation at step %d: %s%s",
            self.step,
            summary,
            " (best)" if better else "",
        )
        if self.dist.main and "bleu_signature" in metrics:
            log.info("BLEU signature: %s", metrics["bleu_signature"])
        if better:
            self.save("best.pt")
        self._save_step_checkpoint()
        self.save("last.pt")
        return bool(t.patience) and self.bad_validations >= t.patience


def plot_metrics(run_dir: Path) -> Path | None:
    """Training and validation loss, and validation BLEU, over steps, as a PNG."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    ]
    train = [r for r in rows if r["type"] == "train"]
    valid = [r for r in rows if r["type"] == "valid"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(
        [r["step"] for r in train], [r["loss"] for r in train], label="train (smoothed)"
    )
    if valid:
        left.plot(
            [r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid"
        )
    left.set_xlabel("step")
    left.set_ylabel("loss per token")
    left.legend()
    if valid and "bleu" in valid[0]:
        right.plot(
            [r["step"] for r in valid], [r["bleu"] for r in valid], "o-", color="C2"
        )
        right.set_ylabel("validation BLEU")
    right.set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def train(cfg: Config, resume: bool | None = None) -> Path:
    """Train a model as configured; returns the path of the best checkpoint."""
    trainer = Trainer(cfg, resume)
    try:
        return trainer.train()
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()
