"""Files written through a temporary name (a crash leaves the old file or the new
one, never half of one), with the permissions a plain write gives.

``tempfile`` creates its files 0600 and its folders 0700, so that nobody else can
read them while they are written; renamed into place they would stay that way, and
a published model or a shared corpus store would be unreadable to other users.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it: put it back at once
    os.umask(mask)
    return mask


def as_if_created(path: str | Path) -> None:
    """Give a file or folder made by ``tempfile`` the mode ``open`` or ``mkdir``
    would have given it under the process's umask (0644 / 0755 under 022)."""
    path = Path(path)
    mode = 0o777 if path.is_dir() else 0o666
    os.chmod(path, mode & ~_umask())


def make_parent(path: Path) -> None:
    """Make ``path``'s folder (and theirs); an error names the folder a file is
    in the way of, not a deeper one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        files = (p for p in reversed(path.parents) if p.exists() and not p.is_dir())
        blocking = next(files, path.parent)
        raise NotADirectoryError(
            errno.ENOTDIR, "is a file, so no folder can be made in it", str(blocking)
        ) from None


def temp_beside(path: Path, make: Callable[..., Any], **kwargs: Any) -> Any:
    """``tempfile.mkstemp`` / ``mkdtemp`` (``make``) in ``path``'s folder; a failure
    names that folder, not the temporary name."""
    try:
        return make(prefix=f".{path.name}.", dir=path.parent, **kwargs)
    except OSError as e:
        raise OSError(
            e.errno, f"cannot write {path.name} there", str(path.parent)
        ) from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path`` (its folder is made),
    flush it to disk, give it the umask's permissions and rename it into place,
    then make the rename itself durable. A kill at any moment leaves the old
    file or the new one; concurrent writers each put a whole file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    make_parent(path)
    fd, tmp = temp_beside(path, tempfile.mkstemp, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        as_if_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` written through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(data))
