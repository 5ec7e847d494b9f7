"""Files written through a temporary name (a crash leaves the old file or the new
one, never half of one), with the permissions a plain write gives.

``tempfile`` creates its files 0600 and its folders 0700, so that nobody else can
read them while they are written; renamed into place they would stay that way, and
a published model or a shared corpus store would be unreadable to other users.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
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
            e.errno, f"cannot write {path.name} there: {e.strerror}", str(path.parent)
        ) from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path`` (its folder is made),
    flush it to disk, give it the umask's permissions and rename it into place,
    then make the rename itself durable. A kill at any moment leaves the old
    file or the new one; concurrent writers each put a whole file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if path.exists() and not path.is_file():  # /dev/stdout, a pipe: no rename
        with open(path, "wb") as f:
            write(f)
        return
    if path.is_symlink():  # the file it points to is written, the link kept
        path = path.resolve()
    make_parent(path)
    fd, tmp = temp_beside(path, tempfile.mkstemp, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        as_if_created(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = write_error(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
    sync_folder(path.parent)


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all: a write that fails (a
    full disk) is cut back off, and the error names the file."""
    with open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def write_error(error: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, named by its number
    (a full disk, a read-only filesystem, no permission), where ``error`` is one
    or wraps one: torch.save's ``RuntimeError: [enforce fail at
    inline_container.cc...] unexpected pos`` is raised while handling the
    ``OSError`` of the write it could not finish."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


def sync_folder(folder: Path) -> None:
    """Make the renames and links in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def free_bytes(folder: str | Path) -> int:
    """The bytes an unprivileged writer may still use on ``folder``'s filesystem."""
    return shutil.disk_usage(folder).free


def link_or_copy(source: Path, target: Path) -> bool:
    """Put ``source``'s bytes at ``target`` (replaced atomically): a hard link
    where the filesystem allows (no bytes written, no space used), else a copy
    through ``atomic_write``. Returns True when it linked. ``source`` is never
    written to, so the bytes behind its other names never change."""
    fd, tmp = temp_beside(target, tempfile.mkstemp, suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # a free name beside ``target``: os.link does not overwrite
    try:
        os.link(source, tmp)
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise OSError(e.errno, e.strerror, str(target)) from None
        needed, free = source.stat().st_size, free_bytes(target.parent)
        if needed > free:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device ({needed:,} bytes needed, {free:,} free)",
                str(target),
            ) from None

        def copy(f: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        atomic_write(target, copy)
        return False
    try:
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(target)) from None
    return True


# a filesystem without hard links (FAT, some network and FUSE filesystems), a
# link count at its limit, or links across filesystems
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` written through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(data))


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
