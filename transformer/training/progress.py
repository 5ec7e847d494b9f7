"""What a run reports as it goes: a progress bar on a terminal, a log line every
``training.log_seconds`` otherwise (a file or a pipe gets tens of lines, not a
redrawn bar), and rows in ``metrics.jsonl`` (and TensorBoard when installed)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from transformer.files import append_whole

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Steps done out of ``total``, with loss, learning rate, tokens/s and ETA."""

    def __init__(
        self, total: int, start: int, enabled: bool, every_seconds: float
    ) -> None:
        self.total, self.start, self.step = total, start, start
        self.enabled, self.every = enabled, every_seconds
        self.terminal = enabled and sys.stderr.isatty()
        self.began = self.last_line = time.perf_counter()
        self.values: dict[str, str] = {}
        self.values_step = start  # the step the values were measured at
        self.bar = (
            tqdm(
                total=total,
                initial=start,
                desc="training",
                unit="step",
                dynamic_ncols=True,
            )
            if self.terminal
            else None
        )

    def update(self, step: int, **values: str) -> None:
        self.step = step
        self.values.update(values)
        if values:
            self.values_step = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if values:
                self.bar.set_postfix(self.values)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last_line >= self.every:
            self.last_line = now
            done = step - self.start
            rate = done / max(now - self.began, 1e-9)
            eta = _duration((self.total - step) / rate) if rate > 0 else "?"
            shown = " ".join(f"{k} {v}" for k, v in self.values.items())
            if shown and self.values_step != step:  # logged every log_every steps
                shown += f" (at step {self.values_step})"
            log.info(
                "step %d/%d (%.0f%%) %s ETA %s",
                step,
                self.total,
                100 * step / max(self.total, 1),
                shown,
                eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """Rows of ``{"type", "step", "time", ...}`` in ``metrics.jsonl`` (rank 0)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"type": kind, "step": step, "time": time.time(), **values}
        append_whole(self.path, (json.dumps(row) + "\n").encode("utf-8"))
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self, curves: bool = False) -> None:
        """Close; with ``curves`` also draw ``curves.png`` (a convenience: when
        it cannot be written, a warning says so and the run's outcome stands)."""
        if self.writer is not None:
            self.writer.close()
        if curves and self.enabled:
            from transformer.plots import plot_metrics

            try:
                plot_metrics(self.path.parent)
            except OSError as e:
                log.warning("curves.png not written: %s", e)
