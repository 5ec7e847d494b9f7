"""Pieces every export shares: its error, the extra, the info file, and writing
the folder (all at once, replacing only an earlier export)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformer.files import as_if_created, make_parent, temp_beside, write_error

EXPORT_INFO = "export.json"
INSTALL_HINT = 'pip install -e ".[export]"'


class ExportError(ValueError):
    """The export cannot be written or read (missing extra, bad option, bad folder)."""


def import_ctranslate2():
    """The ``ctranslate2`` module, or an ``ExportError`` saying how to install it."""
    try:
        import ctranslate2
    except ImportError as e:
        raise ExportError(
            f"ctranslate2 is not installed ({e}); install it with {INSTALL_HINT}"
        ) from None
    return ctranslate2


def check_output_folder(output: Path, force: bool) -> None:
    """``output`` may be created, or (with ``force``) replaced: an earlier export
    (it holds ``EXPORT_INFO``) or an empty folder, never anything else."""
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise ExportError(f"{output} already exists; pass --force to replace it")
    if not output.is_dir() or output.is_symlink():
        raise ExportError(f"{output} exists and is not a folder; not replacing it")
    if any(output.iterdir()) and not (output / EXPORT_INFO).is_file():
        raise ExportError(
            f"{output} is not empty and holds no {EXPORT_INFO}, so it is not an "
            "earlier export; not replacing it"
        )


def write_folder(output: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill`` on a temporary sibling folder, then rename it to ``output``
    (replacing an earlier export, checked by ``check_output_folder``): a failure
    leaves no half export. A full or read-only disk is one ``OSError`` naming
    ``output``."""
    make_parent(output)
    staging = Path(temp_beside(output, tempfile.mkdtemp))
    as_if_created(staging)
    try:
        fill(staging)
        if output.exists():  # an earlier export
            trash = Path(temp_beside(output, tempfile.mkdtemp, suffix=".old"))
            output.rename(trash / output.name)
            try:
                staging.rename(output)
            except BaseException:
                (trash / output.name).rename(output)
                raise
            shutil.rmtree(trash)
        else:
            staging.rename(output)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        cause = write_error(e)  # a full or read-only disk: one line naming it
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(output)) from None
