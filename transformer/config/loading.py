"""Reading an experiment: YAML in (``1e-4`` is a number), ``key.sub=value``
overrides, strict coercion into the dataclasses with errors that name every bad
key, the keys that were renamed or removed, and writing the resolved config."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from transformer.config.base import ConfigError
from transformer.config.coerce import build_dataclass
from transformer.config.model import ARCHITECTURES, foreign_keys, own_keys
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
    if isinstance(tree.get("model"), dict):  # one flat section for every arch
        tree["model"] = own_keys(tree["model"])
    return tree


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
    cfg = build_dataclass(Config, tree, "")
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
        tree = _switch_architecture(tree, overrides, path)
        cfg = config_from_dict(tree, overrides)
    except ConfigError as e:
        given = [k for k, _ in parse_overrides(list(overrides))]
        lines = [f"{_blame(line, given, path)}: {line}" for line in str(e).split("\n")]
        raise ConfigError("\n".join(lines)) from e
    return cfg


def _switch_architecture(
    tree: dict[str, Any], overrides: list[str], path: Path
) -> dict[str, Any]:
    """A file run as another architecture (``model.arch=rnn`` on the command line
    for a Transformer config) without the file's keys of its own architecture,
    which the new one does not have; they are named in a warning."""
    arch = None
    for key, value in parse_overrides(list(overrides)):
        if key == "model.arch":
            arch = value
    model = tree.get("model")
    if arch not in ARCHITECTURES or not isinstance(model, dict):
        return tree
    mine = {f.name for f in dataclasses.fields(ARCHITECTURES[arch])}
    dropped = [k for k in model if k in foreign_keys() and k not in mine]
    if not dropped:
        return tree
    log.warning(
        "%s: %s not used: the command line chose model.arch=%s",
        path,
        ", ".join(f"model.{k}" for k in dropped),
        arch,
    )
    kept = {k: v for k, v in model.items() if k not in dropped}
    return {**tree, "model": kept}


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
