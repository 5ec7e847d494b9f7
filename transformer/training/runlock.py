"""One run per folder: the lock a training (or a preprocessing) holds on its
``training.run_dir`` for as long as it runs.

Two runs in one folder would both write ``last.pt``, ``step_<N>.pt``, ``best.pt``
and ``metrics.jsonl`` and leave a mix of the two (a requeued job whose first copy
is still alive, a command started twice). The lock file ``run.lock`` records its
holder; a second start is refused at once naming it, and the lock of a run that
died (killed, crashed, its machine rebooted) is taken over with a warning. Under
torchrun rank 0 holds it for every rank: when rank 0 cannot take it, no rank
starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformer.config import ConfigError
from transformer.locks import HeldLock, LockHeld, acquire
from transformer.training.distributed import Distributed

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunDirBusy(ConfigError):
    """Another live process trains or preprocesses in this run folder."""


def lock_run_dir(run_dir: Path, ranks: Distributed | None = None) -> HeldLock:
    """Hold ``run_dir``'s lock (rank 0 alone: the other ranks get a lock that
    holds nothing).

    Raises:
        RunDirBusy: another process holds it (on rank 0; the other ranks get a
            ``TrainingError`` saying that rank 0 failed).
    """
    held: list[HeldLock] = []

    def take() -> None:
        path = Path(run_dir) / LOCK_FILE
        try:
            lock = acquire(path)
        except LockHeld as e:
            raise RunDirBusy(
                f"training.run_dir: {run_dir} is in use by another run or "
                f"preprocessing ({e.owner or 'its owner wrote no record yet'}): wait "
                "for it to end, or choose another training.run_dir"
            ) from None
        except OSError as e:
            raise RunDirBusy(
                f"training.run_dir: cannot lock {path}: {e.strerror or e}"
            ) from None
        if lock.previous is not None:
            log.warning(
                "%s: took over the lock left by a process that ended without "
                "releasing it (%s)",
                run_dir,
                lock.previous,
            )
        held.append(lock)

    if ranks is None:
        take()
    else:
        ranks.on_main(take, "locking the run folder")
    return held[0] if held else HeldLock(Path(run_dir) / LOCK_FILE, None, None)
