"""Reading parallel corpora in any supported format, with clear errors.

Local files (plain text pairs, TSV, JSONL; gzipped or not) are read line by line by
our own readers, which check alignment and UTF-8 and name the file and line of any
fault. Hub corpora, and local files given to one of its generic builders (json,
csv, parquet), go through Hugging Face ``datasets``. Synthetic copy / reverse tasks
need no files at all. Every reader is a stream: nothing holds a whole corpus.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformer.config import DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The corpus is missing, misaligned or unreadable."""


# --- reading ---


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"missing data file: expected {directory / stem} or {directory / stem}.gz"
    )


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(
    path: Path, replace_invalid: bool = False, hint: str = ""
) -> Iterator[str]:
    """Yield the lines of a (gzipped) UTF-8 file without line ends, checking UTF-8.

    Lines end at ``\\n`` only: other Unicode separators (U+2028, form feed, ...)
    stay inside their line, so that one line in is one line out. Invalid UTF-8 is
    an error naming the line, or, with ``replace_invalid``, replaced by U+FFFD. A
    UTF-8 byte-order mark at the start is dropped. ``hint`` ends that error
    (e.g. the option that replaces invalid bytes).
    """
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if not replace_invalid:
                        raise DataError(
                            f"{path}:{number}: not valid UTF-8 "
                            f"(byte {raw[e.start]:#04x} at column {e.start + 1}){hint}"
                        ) from None
                    log.warning("%s:%d: invalid UTF-8 replaced", path, number)
                    line = raw.decode("utf-8", errors="replace")
                if number == 1:  # a byte-order mark is not text (BLEU would count it)
                    line = line.removeprefix("\ufeff")
                yield line.rstrip("\r\n")
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _count_rest(lines: Iterator[str]) -> int:
    return sum(1 for _ in lines)


def read_text_pairs(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """Yield aligned (source, target) lines; mismatched line counts are an error."""
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    n = 0
    while True:
        s = next(src_lines, None)
        t = next(tgt_lines, None)
        if s is None and t is None:
            return
        if s is None or t is None:
            n_src = n + (0 if s is None else 1 + _count_rest(src_lines))
            n_tgt = n + (0 if t is None else 1 + _count_rest(tgt_lines))
            raise DataError(
                f"parallel files differ in length: {src_path} has {n_src} lines but "
                f"{tgt_path} has {n_tgt}"
            )
        n += 1
        yield s, t


def read_tsv_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """(source, target) per line; a blank line is an empty pair, as in plain text
    files (the filter drops it and counts it), so that line numbers still match."""
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            yield "", ""
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{path}:{number}: expected 2 tab-separated fields "
                f"(source, target), found {len(fields)}"
            )
        yield fields[0], fields[1]


def _field(row: dict[str, Any], dotted: str, where: str) -> str:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: no field '{dotted}' (keys: {list(row)})")
        value = value[part]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{dotted}' is not a string: {value!r}")
    return value


def _fields(cfg: DataConfig, row: dict[str, Any]) -> tuple[str, str]:
    """Default field names: ``translation.{lang}`` if present, else ``{lang}``."""

    def default(lang: str) -> str:
        inner = row.get("translation")
        return f"translation.{lang}" if isinstance(inner, dict) else lang

    return cfg.src_field or default(cfg.src_lang), cfg.tgt_field or default(
        cfg.tgt_lang
    )


def read_jsonl_pairs(path: Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        src_key, tgt_key = _fields(cfg, row)
        yield _field(row, src_key, where), _field(row, tgt_key, where)


def read_hub_pairs(cfg: DataConfig, split: str) -> Iterator[tuple[str, str]]:
    """Rows of a ``datasets`` corpus: a hub name, or with ``data.dir`` one of its
    generic builders (``json``, ``csv``, ``parquet``, ``text``) over the local files
    ``{dir}/{split}.*``."""
    import datasets

    extra = {}
    if cfg.dir:
        extra["data_files"] = {split: [str(f) for f in hub_local_files(cfg, split)]}
    try:
        rows = datasets.load_dataset(
            cfg.hub_name, cfg.hub_config, split=split, streaming=True, **extra
        )
    except Exception as e:  # datasets raises many types; say which corpus failed
        raise DataError(
            f"cannot load hub dataset {cfg.hub_name!r} (config {cfg.hub_config!r}, "
            f"split {split!r}): {e}"
        ) from e
    for number, row in enumerate(rows):
        src_key, tgt_key = _fields(cfg, row)
        where = f"{cfg.hub_name}[{split}] row {number}"
        yield _field(row, src_key, where), _field(row, tgt_key, where)


# what the generic builders read, maybe sharded (train.00.jsonl) and compressed;
# not train.jsonl.bak, train.jsonl~ or a half-copied train.jsonl.part
_HUB_FILE = r"(\.[\w-]+)*\.(jsonl?|csv|tsv|parquet|arrow|txt)(\.(gz|bz2|xz|zst))?"


def hub_local_files(cfg: DataConfig, split: str) -> list[Path]:
    """The files ``{dir}/{split}.*`` a generic ``datasets`` builder reads."""
    pattern = re.compile(re.escape(split) + _HUB_FILE)
    files = sorted(
        f for f in Path(cfg.dir).glob(f"{split}.*") if pattern.fullmatch(f.name)
    )
    if not files:
        raise DataError(
            f"{Path(cfg.dir) / (split + '.*')}: no data file for split {split!r} "
            "(.json, .jsonl, .csv, .tsv, .parquet, .arrow or .txt, maybe .gz)"
        )
    return files


def toy_pairs(cfg: DataConfig, split: str, seed: int) -> list[tuple[str, str]]:
    """Synthetic copy / reverse task over letters; deterministic per split."""
    size = cfg.toy_train_size if split == cfg.train_split else cfg.toy_valid_size
    rng = random.Random(f"{seed}-{split}")
    letters = [chr(ord("a") + i) for i in range(min(cfg.toy_vocab, 26))]
    pairs = []
    for _ in range(size):
        words = rng.choices(letters, k=rng.randint(cfg.toy_min_len, cfg.toy_max_len))
        target = words if cfg.format == "copy" else words[::-1]
        pairs.append((" ".join(words), " ".join(target)))
    return pairs


def check_split(cfg: DataConfig, split: str, key: str) -> None:
    """Fail early, naming the config key, when a split's local files are missing
    (rather than after the tokenizer and the training store are built)."""
    if cfg.toy or not split:
        return
    for src, tgt in cfg.directions():  # each direction's files, with data.pairs
        settings = cfg.direction(src, tgt) if cfg.multilingual else cfg
        try:
            if cfg.format == "hub":
                if cfg.dir:
                    hub_local_files(settings, split)
            else:
                split_files(settings, split)
        except DataError as e:
            raise DataError(f"{key}={split!r}: {e}") from None


def split_files(cfg: DataConfig, split: str) -> list[Path]:
    """The local files behind a split (raises if any is missing)."""
    if not cfg.dir:
        raise DataError(
            f"data.dir: format '{cfg.format}' needs a directory (pass data.dir=PATH)"
        )
    directory = Path(cfg.dir)
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    if cfg.format == "text":
        return [
            _find(directory, f"{split}.{cfg.src_lang}"),
            _find(directory, f"{split}.{cfg.tgt_lang}"),
        ]
    return [_find(directory, f"{split}.{cfg.format}")]


def split_origin(cfg: DataConfig, split: str) -> str:
    """Where a split is read from, for messages: its files, or the hub corpus."""
    if cfg.toy:
        return f"the synthetic {cfg.format} task ({split})"
    if cfg.format == "hub":
        return f"hub dataset {cfg.hub_name!r} (split {split!r})"
    try:
        return ", ".join(str(p) for p in split_files(cfg, split))
    except DataError:
        return f"{cfg.dir}/{split}.*"


def read_pairs(cfg: DataConfig, split: str, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Stream the (source, target) strings of a split, whatever the format."""
    if cfg.toy:
        yield from toy_pairs(cfg, split, seed)
    elif cfg.format == "hub":
        yield from read_hub_pairs(cfg, split)
    elif cfg.format == "text":
        yield from read_text_pairs(*split_files(cfg, split))
    elif cfg.format == "tsv":
        yield from read_tsv_pairs(split_files(cfg, split)[0])
    else:
        yield from read_jsonl_pairs(split_files(cfg, split)[0], cfg)
