"""Strict coercion of plain values (parsed YAML, JSON, command-line options) into
the config dataclasses, with errors that name every bad key by its dotted path and
suggest the nearest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from transformer.config.base import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: must be one of {', '.join(map(repr, choices))} (got {value!r})"
            )
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (got {value!r})")
        return {
            _coerce(key_type, k, f"{key}"): _coerce(value_type, v, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list (got {value!r})")
        return [_coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(
                f"{key}: expected a list of {len(args)} values (got {value!r})"
            )
        return tuple(
            _coerce(a, v, f"{key}[{i}]")
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (got {value!r})")
        variant = getattr(tp, "variant", None)  # a section with a class per kind
        return build_dataclass(variant(value, key) if variant else tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 25e3 written for 25000
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer (got {value!r})")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: {value} does not fit in 64 bits")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number (got {value!r})")
        if math.isnan(value):  # every range check would pass it
            raise ConfigError(f"{key}: expected a number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string (got {value!r})")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


# keys that existed once: the error says what took their place
REMOVED_KEYS = {
    "data.streaming": "removed: the corpus store reads a corpus of any size in a "
    "stream (delete this key)",
    "data.stream_buffer": "removed: the corpus store reads a corpus of any size in "
    "a stream (delete this key)",
    "data.tokenizer.input_sentence_size": "renamed data.tokenizer.sample_sentences",
}


def _suggest(key: str, names: list[str]) -> str | None:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return close[0]
    words = set(key.split("_"))  # match on words too: 'lr_warmup' ~ 'warmup_steps'
    return next((n for n in names if words & set(n.split("_"))), None)


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """``cls(**values)`` with each value checked against its annotation; an unknown
    key, a wrong type or a bad choice is a ConfigError naming ``prefix.key``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = []
    for key in values:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if dotted in REMOVED_KEYS:
                unknown.append(f"{dotted}: {REMOVED_KEYS[dotted]}")
                continue
            close = _suggest(str(key), names)
            where = f"{prefix}.{close}" if prefix and close else close
            unknown.append(
                f"{dotted}: unknown key" + (f"; did you mean {where}?" if close else "")
            )
    if unknown:
        raise ConfigError("\n".join(unknown))
    kwargs = {
        key: _coerce(hints[key], value, f"{prefix}.{key}" if prefix else str(key))
        for key, value in values.items()
    }
    return cls(**kwargs)
