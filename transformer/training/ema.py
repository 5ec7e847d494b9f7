"""An exponential moving average (EMA) of the weights (``training.ema_decay``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from transformer.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class EMA:
    """After every update, ``ema = d * ema + (1 - d) * weights``, where ``d`` is
    ``decay``, or with ``warmup`` ``min(decay, (1 + n) / (10 + n))`` after ``n``
    earlier updates (as TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates`` and OpenNMT-py's ``average_decay``).

    The average is kept in float32 on the model's device, whatever the weights'
    dtype. Tied weights (one tensor under several state-dict names) are averaged
    once and saved as one shared tensor. Entries that are not floating point are
    not averaged: the state dict gives the model's own.

    Args:
        model: the model being trained; the average starts from its weights.
        decay: in (0, 1).
        warmup: a smaller decay for the first updates.
        updates: the updates already folded in (a resumed average).
    """

    def __init__(
        self, model: nn.Module, decay: float, warmup: bool = False, updates: int = 0
    ) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, updates
        self._live: list[Tensor] = []  # the model's tensors, each once
        self._avg: list[Tensor] = []  # their averages, float32
        self._index: dict[str, int] = {}  # state-dict name -> position in the lists
        self._other: dict[str, Tensor] = {}  # integer buffers, not averaged
        seen: dict[int, int] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                self._other[name] = tensor
                continue
            if id(tensor) not in seen:
                seen[id(tensor)] = len(self._live)
                self._live.append(tensor)
                self._avg.append(tensor.detach().float().clone())
            self._index[name] = seen[id(tensor)]

    def current_decay(self) -> float:
        """The decay of the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average."""
        live = [t.detach().float() for t in self._live]  # no copy when float32
        # avg + (1 - d) * (live - avg): one pass, not a multiply and an add
        torch._foreach_lerp_(self._avg, live, 1.0 - self.current_decay())
        self.updates += 1

    def checkpoint_entries(self) -> dict[str, Any]:
        """What a checkpoint holds of the average: the weights (``ema``), the
        updates folded in (``ema_updates``) and whether it warms up
        (``ema_warmup``): a resumed average goes on as it began."""
        return {
            "ema": self.state_dict(),
            "ema_updates": self.updates,
            "ema_warmup": self.warmup,
        }

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, loadable into the model (``load_state_dict``)."""
        state = {name: self._avg[i] for name, i in self._index.items()}
        return {**state, **{k: v.detach() for k, v in self._other.items()}}

    def load_state_dict(self, state: dict[str, Tensor], path: str | Path) -> None:
        """Restore the average saved in checkpoint ``path`` exactly."""
        names = self._index.keys() | self._other.keys()
        if state.keys() != names:
            diff = sorted(state.keys() ^ names)
            raise CheckpointError(
                f"{path}: its EMA weights do not fit the model ({', '.join(diff[:3])})"
            )
        with torch.no_grad():
            for name, i in self._index.items():
                if state[name].shape != self._avg[i].shape:
                    raise CheckpointError(
                        f"{path}: EMA weight {name} has shape "
                        f"{tuple(state[name].shape)}, the model "
                        f"{tuple(self._avg[i].shape)}"
                    )
                self._avg[i].copy_(state[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its
        own again, bit for bit (validation with ``training.validate_ema``)."""
        raw = [t.detach().clone() for t in self._live]
        with torch.no_grad():
            for live, avg in zip(self._live, self._avg, strict=True):
                live.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for live, saved in zip(self._live, raw, strict=True):
                    live.copy_(saved)


def build_ema(
    model: nn.Module,
    decay: float,
    warmup: bool,
    ckpt: dict[str, Any] | None,
    path: Path,
) -> EMA | None:
    """The run's average (None when ``decay`` is 0), restored from the checkpoint
    ``ckpt`` a run resumes from with its count of updates (the warm-up goes on
    from there; an average saved before warm-ups existed goes on without one);
    one saved without an average starts it afresh from the resumed weights."""
    saved = None if ckpt is None else ckpt.get("ema")
    if decay == 0:
        if saved is not None:
            log.warning(
                "%s holds EMA weights, but training.ema_decay is 0: they are not kept",
                path,
            )
        return None
    if saved is not None:
        # the average goes on as it began (written before warm-ups existed: none)
        began = ckpt.get("ema_warmup", False) is True
        if began != warmup:
            how = "with" if began else "without"
            log.info("%s: its EMA began %s a warm-up; it goes on %s", path, how, how)
        warmup = began
    updates = 0 if saved is None else ckpt.get("ema_updates", 0)
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        raise CheckpointError(f"{path}: ema_updates is {updates!r}, not a count")
    ema = EMA(model, decay, warmup, updates)
    if saved is not None:
        ema.load_state_dict(saved, path)
    elif ckpt is not None:
        log.warning(
            "%s holds no EMA weights: the average starts from its weights", path
        )
    return ema
