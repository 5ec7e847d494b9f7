"""DataLoader worker processes: which signals stop them, how their errors reach
the main process, and how they are ended when it stops.

Signals. A terminal's Ctrl-C reaches the whole process group, and a SIGTERM may
reach every process of the job (a scheduler's signal to the group, torchrun's
``killpg``, ``pkill -f``, systemd's control group, Slurm's job step); a worker
killed by it would fail the run mid-step. So a worker ignores SIGINT and the
first SIGTERM from anyone but its parent: the main process finishes its step,
saves and shuts the workers down. A SIGTERM from the parent (the DataLoader's
shutdown of a worker that did not stop, or ``multiprocessing``'s exit handler,
which sends each live worker one SIGTERM and then waits for it) ends the worker
at once; so does a second SIGTERM from anyone (a user who insists). A worker
whose parent is gone ends by itself (the DataLoader's watchdog).

To tell who sent a SIGTERM the signal is blocked in the worker and taken by a
thread with ``sigwaitinfo``, which gives the sender's pid; a Python signal
handler does not.

Errors. A worker that fails sends a ``WorkerFailure`` in place of the batch
(the DataLoader would re-raise the exception with its traceback folded into the
message); the main process stops every worker and raises one exception naming
the worker, the batch and the error.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from transformer.data.readers import DataError

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A data worker failed (a bug, or a worker killed): training cannot go on."""


@dataclass
class WorkerFailure:
    """What a worker sends when collating failed (picklable, unlike some errors)."""

    worker: int
    epoch: int
    batch: int
    kind: str  # the exception's type name
    message: str
    trace: str
    user_error: bool  # a DataError: a damaged or bad input, not a bug

    @classmethod
    def of(cls, error: Exception, worker: int, epoch: int, batch: int) -> WorkerFailure:
        return cls(
            worker,
            epoch,
            batch,
            type(error).__name__,
            str(error),
            traceback.format_exc(),
            isinstance(error, DataError),
        )

    def error(self, rank: int | None = None) -> Exception:
        """The exception the main process raises (a bug's traceback is logged);
        ``rank``: the worker's rank, under torchrun."""
        where = f"data worker {self.worker} (epoch {self.epoch}, batch {self.batch})"
        where = where if rank is None else f"rank {rank}'s {where}"
        if self.user_error:
            return DataError(f"{where}: {self.message}")
        log.error("%s failed:\n%s", where, self.trace.rstrip())
        return WorkerError(f"{where} failed: {self.kind}: {self.message}")


def worker_died(error: BaseException) -> WorkerError | None:
    """The DataLoader's error for a worker that died (killed by the OOM killer, a
    segfault) as a ``WorkerError``; None for any other error. The DataLoader
    raises it from ``next()``, or from its SIGCHLD handler wherever the main
    process is at that moment."""
    text = str(error)
    if isinstance(error, RuntimeError) and text.startswith("DataLoader worker"):
        return WorkerError(text.splitlines()[0])
    return None


def worker_failure(error: BaseException) -> str | None:
    """What went wrong when ``error`` is a data worker's failure or death (the
    main process's ``stream`` stopped the workers), None for any other error."""
    if isinstance(error, WorkerError):
        return str(error)
    died = worker_died(error)
    return None if died is None else str(died)


def quiet_worker(worker_id: int) -> None:
    """``worker_init_fn``: SIGINT ignored, SIGTERM taken by ``_watch_sigterm``
    (where there is no ``sigwaitinfo``, as on macOS, SIGTERM keeps its default:
    a group's SIGTERM then fails the run, but nothing hangs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what a second one does
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads inherit it
    threading.Thread(
        target=_watch_sigterm, args=(os.getppid(),), name="sigterm", daemon=True
    ).start()


def _watch_sigterm(parent: int) -> None:
    others = 0
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            # the parent stops this worker: a plain exit, so that the DataLoader's
            # SIGCHLD check does not take it for a crash while its parent exits
            os._exit(0)
        others += 1
        if others >= 2:  # the default action, which the mask held back
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


def stop_workers(batches: Any) -> None:
    """End a DataLoader iterator's workers now, not when it is garbage collected
    (a traceback that holds it would keep them alive until the interpreter's
    exit). Uses the iterator's own shutdown where this torch has it."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
