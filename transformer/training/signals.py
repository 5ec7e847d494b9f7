"""Stopping on Ctrl-C / SIGTERM without ever cutting an update or a save in two.

The first signal asks the run to stop after the current step (every rank stops
together: the request travels with the step's all-reduce). A second one stops at
once, except inside a critical section (an update's commit, a checkpoint write),
which it lets finish first; a third one does not wait.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The stop request of this process, and its critical sections."""

    def __init__(self) -> None:
        self.requested = False
        self._depth, self._pending = 0, False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            log.warning(
                "%s: stopping after this step (again to stop at once)",
                signal.Signals(signum).name,
            )
            return
        if self._depth and not self._pending:
            self._pending = True  # raised once the update or the save is whole
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section a second signal does not cut (an update's commit, a save)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending:
            self._pending = False
            raise KeyboardInterrupt
