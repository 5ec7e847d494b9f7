"""Exclusive locks that a crash cannot leave behind: an ``flock`` on a file that
records its owner (host, pid, start time).

The kernel drops an ``flock`` when the last descriptor of its open file goes, so
a killed owner never keeps a lock: whoever takes it next finds the dead owner's
record in the file and says so. A lock is per process: taking the same file
again in the holding process shares the lock (a count), and a forked child
(a DataLoader worker) closes its inherited descriptor, so that a child which
outlives its parent never holds its parent's lock.

Not ``filelock``: it removes the file on release (a lock taken meanwhile through
the old name would then lock a file nobody else sees) and has no owner record;
the record is what makes a refusal say who holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: no lock, with a warning
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    """Who holds (or last held) a lock."""

    host: str
    pid: int
    since: str  # ISO 8601 local time with offset

    def __str__(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"

    @classmethod
    def me(cls) -> Owner:
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), now)

    @classmethod
    def parse(cls, text: bytes) -> Owner | None:
        try:
            data = json.loads(text.decode("utf-8"))
            return cls(str(data["host"]), int(data["pid"]), str(data["since"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class LockHeld(Exception):
    """The lock file ``path`` is held by another process (``owner``: its record,
    None when it wrote none yet)."""

    def __init__(self, path: Path, owner: Owner | None) -> None:
        self.path, self.owner = path, owner
        super().__init__(f"{path}: held by {owner or 'another process'}")


# this process's locks: (device, inode) -> [descriptor, holders]
_held: dict[tuple[int, int], list[int]] = {}
_mutex = threading.Lock()
_fork_hook = False


def _forget_in_child() -> None:
    """In a forked child: close the inherited descriptors (the parent's still
    holds each lock; an unlock here would release the parent's)."""
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


def _drop(key: tuple[int, int], pid: int) -> None:
    if os.getpid() != pid:  # a finalizer run in a forked child
        return
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1]:
            return
        del _held[key]
    fd = entry[0]
    try:
        os.ftruncate(fd, 0)  # an empty file: released, not abandoned
    except OSError:
        pass
    finally:
        os.close(fd)  # drops the flock


class HeldLock:
    """A lock this process holds; ``release()`` (or garbage collection) drops it.

    Attributes:
        path: the lock file.
        previous: the record of an owner that ended without releasing the lock
            (a crash, a kill), None otherwise.
    """

    def __init__(
        self, path: Path, key: tuple[int, int] | None, previous: Owner | None
    ) -> None:
        self.path, self.previous = path, previous
        self._release = (
            weakref.finalize(self, _drop, key, os.getpid()) if key else lambda: None
        )

    def release(self) -> None:
        self._release()


def acquire(path: str | Path) -> HeldLock:
    """Take the lock file ``path`` (created if missing) without waiting.

    Raises:
        LockHeld: another process holds it.
        OSError: the file cannot be created or opened.
    """
    global _fork_hook
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        with _mutex:
            if key in _held:  # this process holds it already: share
                _held[key][1] += 1
                shared = True
            else:
                shared = False
        if shared or fcntl is None:
            if not shared:
                log.warning("%s: no file locks on this platform: not locked", path)
            return HeldLock(path, key if shared else None, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, Owner.parse(os.pread(fd, 4096, 0))) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning(
                "%s: the filesystem does not support file locks (%s): not locked",
                path,
                e.strerror,
            )
            return HeldLock(path, None, None)
        previous = Owner.parse(os.pread(fd, 4096, 0))
        record = json.dumps(Owner.me().__dict__).encode() + b"\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError as e:  # a full disk: held all the same, without a record
            log.debug("%s: no owner record written (%s)", path, e.strerror)
        with _mutex:
            _held[key] = [fd, 1]
            fd = -1  # the registry owns it now
            if not _fork_hook and hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_forget_in_child)
                _fork_hook = True
        return HeldLock(path, key, previous)
    finally:
        if fd >= 0:
            os.close(fd)


def is_held(path: str | Path) -> bool:
    """Does a live process hold the lock file ``path``? (False when it is
    missing or the platform has no locks.)"""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False
