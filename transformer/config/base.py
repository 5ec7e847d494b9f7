"""What every section shares: the special token ids, the error, the check."""

from __future__ import annotations

from typing import Any

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why} (got {value!r})")
