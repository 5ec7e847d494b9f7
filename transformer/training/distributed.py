"""Data-parallel ranks: who is rank 0, the collectives the loop needs, and waits
for rank 0's one-off work that never race the process group's timeout."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from transformer.training.state import TrainingError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Distributed:
    """This process's place among the ranks (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    prepare_timeout: float = 86400.0
    _waits: Any = None  # a gloo group with the long timeout, for waits on rank 0

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

    def init(
        self, device: torch.device, timeout: float, prepare_timeout: float
    ) -> None:
        """Join the process group (NCCL on CUDA, gloo on CPU) with ``timeout``
        seconds for collectives, and a second group for waits on rank 0."""
        if not self.enabled:
            return
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=timeout),
            )
        self.prepare_timeout = prepare_timeout
        self._waits = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=prepare_timeout)
        )

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def _on_rank0(self, what: str, box: list[Any]) -> None:
        """Receive ``box`` from rank 0 on the long-timeout group."""
        try:
            dist.broadcast_object_list(box, src=0, group=self._waits)
        except (RuntimeError, dist.DistError) as e:
            raise TrainingError(
                f"rank {self.rank}: no word from rank 0 while {what} within "
                f"training.prepare_timeout={self.prepare_timeout:g} s, or rank 0 "
                f"failed ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from e

    def _main_then_share(
        self, fn: Callable[[], T], what: str, share: bool
    ) -> tuple[T | None, Any]:
        """Run ``fn`` on rank 0 and tell every rank how it went (and, with
        ``share``, its result). A failure there stops every rank, naming it."""
        error, result = None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:
                error = e
        failed = None if error is None else f"{type(error).__name__}: {error}"
        box = [(failed, result if share else None)]
        self._on_rank0(what, box)
        if error is not None:
            raise error
        failed, shared = box[0]
        if failed is not None:
            raise TrainingError(f"rank 0 failed while {what}: {failed}")
        return result, shared

    def main_first(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0, then on the other ranks (which then find what
        rank 0 wrote: a tokenizer, a corpus cache)."""
        if not self.enabled:
            return fn()
        result, _ = self._main_then_share(fn, what, share=False)
        return result if self.main else fn()  # type: ignore[return-value]

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """``fn``'s result, computed on rank 0 alone, on every rank."""
        if not self.enabled:
            return fn()
        _, shared = self._main_then_share(fn, what, share=True)
        return shared

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0, None elsewhere."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.main else None
        try:
            dist.gather_object(obj, out, dst=0, group=self._waits)
        except (RuntimeError, dist.DistError) as e:
            raise self._lost("a gather", e) from e
        return out

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in place). A rank that is gone (its
        process failed or was killed) ends this one with one line, not a
        traceback from inside the collective."""
        if self.enabled:
            try:
                dist.all_reduce(values)
            except (RuntimeError, dist.DistError) as e:
                raise self._lost("a step's all-reduce", e) from e
        return values

    def _lost(self, where: str, e: Exception) -> TrainingError:
        first = (str(e).splitlines() or [""])[0]
        return TrainingError(
            f"rank {self.rank}: lost the other ranks in {where} "
            f"({type(e).__name__}: {first}); another rank failed or stopped: its "
            "error says why"
        )
