"""Pieces both sides of an export share: its error, the extra, the info file."""

from __future__ import annotations

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
