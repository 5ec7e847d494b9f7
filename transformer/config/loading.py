"""Reading an experiment: YAML in (``1e-4`` is a number), ``key.sub=value``
overrides, strict coercion into the dataclasses with errors that name every bad
key, the keys that were renamed or removed, and writing the resolved config."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from transformer.config.base import ConfigError
from transformer.config.sections import Config
from transformer.files import atomic_write_bytes

log = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4`` is a number (YAML 1.2), not a string.

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-4``); users write
    ``lr: 1e-4`` and expect a number. A key written twice in one mapping is an
    error (PyYAML keeps the last silently: a second ``training:`` section would
    drop the whole first one).
    """

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:  # before construction, which merges ``<<`` in place
            _check_duplicates(node, set())
        return node


def _check_duplicates(node: yaml.Node, seen: set[int]) -> None:
    """Refuse a mapping that writes one key twice (its own keys, not merged ones)."""
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                key = (key_node.tag, key_node.value)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first on line "
                        f"{first[key] + 1})",
                        key_node.start_mark,
                    )
                first[key] = key_node.start_mark.line
            _check_duplicates(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _check_duplicates(child, seen)


_MERGE = "tag:yaml.org,2002:merge"

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML as configs and overrides are read (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


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
        return _build(tp, value, key)
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


def migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A stored config of an older version with today's keys (for checkpoints)."""
    tree = _deep_copy(tree)
    data = tree.get("data") or {}
    data.pop("streaming", None)
    data.pop("stream_buffer", None)
    tokenizer = data.get("tokenizer") or {}
    if "input_sentence_size" in tokenizer:
        size = tokenizer.pop("input_sentence_size")
        tokenizer.setdefault("sample_sentences", size or 1_000_000)
    return tree


def _suggest(key: str, names: list[str]) -> str | None:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return close[0]
    words = set(key.split("_"))  # match on words too: 'lr_warmup' ~ 'warmup_steps'
    return next((n for n in names if words & set(n.split("_"))), None)


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` arguments; values are read as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(
    tree: dict[str, Any], overrides: list[str] = (), across_sections: bool = True
) -> Config:
    """Build and validate a ``Config`` from a nested dict plus overrides.

    ``across_sections=False`` skips the checks between sections, for the stored
    config of a trained model, which stays usable when such a check is added.
    """
    tree = _deep_copy(tree or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    if across_sections:
        cfg.validate()
    else:
        for section in (cfg.data, cfg.model, cfg.training, cfg.decoding):
            section.validate()
    return cfg


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file, apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start})"
        ) from None
    try:
        tree = read_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not tree:
        raise ConfigError(
            f"{path}: empty config (expected the sections data, model, training, "
            "decoding)"
        )
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        cfg = config_from_dict(tree, overrides)
    except ConfigError as e:
        given = [k for k, _ in parse_overrides(list(overrides))]
        lines = [f"{_blame(line, given, path)}: {line}" for line in str(e).split("\n")]
        raise ConfigError("\n".join(lines)) from e
    _warn_unused_model_keys(cfg, tree, overrides, path)
    return cfg


def _warn_unused_model_keys(
    cfg: Config, tree: dict[str, Any], overrides: list[str], path: Path
) -> None:
    """Name the model keys that the chosen architecture ignores: those given on
    the command line, and the file's own when the file chose the architecture
    (a Transformer config run with ``model.arch=rnn`` is not warned about)."""
    command_line = [
        key.split(".", 1)[1]
        for key, _ in parse_overrides(list(overrides))
        if key.startswith("model.") and key.count(".") == 1
    ]
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    in_file = list(model) if "arch" in model else []
    for source, keys in ((path, in_file), ("command line", command_line)):
        unused = cfg.model.unused(keys)
        if unused:
            log.warning(
                "%s: %s not used by model.arch=%s",
                source,
                ", ".join(f"model.{key}" for key in unused),
                cfg.model.arch,
            )


def _blame(message: str, overrides: list[str], path: Path) -> str:
    """Whose key an error line names: the command line's when an override set it,
    or a key inside it, or a section it lies in (``traning.lr=1``), else the file's."""
    key = message.split(":", 1)[0]
    for given in overrides:
        if key == given or given.startswith(key + ".") or key.startswith(given + "."):
            return "command line"
    return str(path)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    atomic_write_bytes(path, text.encode("utf-8"))
