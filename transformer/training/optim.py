"""The optimizer, the learning-rate schedule and the fp16 gradient scaler."""

from __future__ import annotations

import math

import torch

from transformer.config import Config


def lr_factor(step: int, cfg: Config) -> float:
    """Learning rate at update ``step`` (1-based); ``training.lr`` is the peak.

    noam is the paper's ``d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``
    scaled to peak at ``lr`` at step ``warmup_steps``, which makes it
    ``lr * min(sqrt(warmup / step), step / warmup)``: the same curve as
    inverse_sqrt with its linear warm-up. The paper's own rate is
    ``lr = d_model^-0.5 * warmup^-0.5`` (7e-4 for the base model).

    With ``cooldown_steps`` = C, updates past ``max_steps - C`` scale the schedule's
    rate linearly down to 1 / C at ``max_steps`` (warmup-stable-decay style). Earlier
    updates are unchanged, so a run resumed at ``max_steps - C`` with the cool-down
    switched on follows the same schedule as one started with it.
    """
    t = cfg.training
    step = max(step, 1)
    if t.schedule == "noam":
        rate = t.lr * min(math.sqrt(t.warmup_steps / step), step / t.warmup_steps)
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


def build_optimizer(
    cfg: Config, model: torch.nn.Module, device: torch.device
) -> tuple[
    torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler
]:
    """Adam(W) whose rate the scheduler sets, and a scaler active for fp16 on CUDA."""
    t = cfg.training
    # One fused kernel per update instead of foreach's passes over every tensor,
    # on CPU as on CUDA: the update reads and writes each parameter once.
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(
        model.parameters(),
        lr=1.0,  # the scheduler's factor is the learning rate
        betas=t.betas,
        eps=t.eps,
        weight_decay=t.weight_decay,
        **fused,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step + 1, cfg)
    )
    scaler = torch.amp.GradScaler(
        device.type, enabled=t.precision == "fp16" and device.type == "cuda"
    )
    return optimizer, scheduler, scaler
