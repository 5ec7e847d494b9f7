"""Parallel corpora: reading with clear errors, filtering, caching, token batches.

Local files (plain text pairs, TSV, JSONL; gzipped or not) are read line by line by
our own readers, which check alignment and UTF-8 and name the file and line of any
fault. Hub corpora, and local files given to one of its generic builders (json,
csv, parquet), go through Hugging Face ``datasets`` (streamed when asked).
Synthetic copy / reverse tasks need no files at all.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.config import BOS_ID, EOS_ID, PAD_ID, DataConfig
from transformer.tokenizer import Tokenizer

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


def read_lines(path: Path, replace_invalid: bool = False) -> Iterator[str]:
    """Yield the lines of a (gzipped) UTF-8 file without line ends, checking UTF-8.

    Lines end at ``\\n`` only: other Unicode separators (U+2028, form feed, ...)
    stay inside their line, so that one line in is one line out. Invalid UTF-8 is
    an error naming the line, or, with ``replace_invalid``, replaced by U+FFFD.
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
                            f"(byte {raw[e.start]:#04x} at column {e.start + 1})"
                        ) from None
                    log.warning("%s:%d: invalid UTF-8 replaced", path, number)
                    line = raw.decode("utf-8", errors="replace")
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
    for number, line in enumerate(read_lines(path), start=1):
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
        files = sorted(str(f) for f in Path(cfg.dir).glob(f"{split}.*"))
        if not files:
            raise DataError(f"{Path(cfg.dir) / (split + '.*')}: no file for split")
        extra["data_files"] = {split: files}
    try:
        rows = datasets.load_dataset(
            cfg.hub_name, cfg.hub_config, split=split, streaming=cfg.streaming, **extra
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
    if cfg.synthetic:
        return f"the synthetic {cfg.format} task ({split})"
    if cfg.format == "hub":
        return f"hub dataset {cfg.hub_name!r} (split {split!r})"
    try:
        return ", ".join(str(p) for p in split_files(cfg, split))
    except DataError:
        return f"{cfg.dir}/{split}.*"


def read_pairs(cfg: DataConfig, split: str, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Stream the (source, target) strings of a split, whatever the format."""
    if cfg.synthetic:
        yield from toy_pairs(cfg, split, seed)
    elif cfg.format == "hub":
        yield from read_hub_pairs(cfg, split)
    elif cfg.format == "text":
        yield from read_text_pairs(*split_files(cfg, split))
    elif cfg.format == "tsv":
        yield from read_tsv_pairs(split_files(cfg, split)[0])
    else:
        yield from read_jsonl_pairs(split_files(cfg, split)[0], cfg)


# --- tokenized corpora ---


@dataclass
class FilterStats:
    kept: int = 0
    empty: int = 0
    too_long: int = 0
    bad_ratio: int = 0

    def log(self, split: str) -> None:
        dropped = self.empty + self.too_long + self.bad_ratio
        log.info(
            "%s: kept %d pairs, dropped %d (empty %d, over max_length %d, "
            "length ratio %d)",
            split,
            self.kept,
            dropped,
            self.empty,
            self.too_long,
            self.bad_ratio,
        )

    def nothing_kept(self, cfg: DataConfig, split: str) -> DataError:
        """The error for a split whose every pair was filtered out."""
        seen = self.kept + self.empty + self.too_long + self.bad_ratio
        removed = [
            (self.empty, "empty on a side"),
            (self.too_long, f"longer than data.max_length={cfg.max_length} pieces"),
            (
                self.bad_ratio,
                f"length ratio over data.max_length_ratio={cfg.max_length_ratio}",
            ),
        ]
        why = ", ".join(f"{n} {what}" for n, what in removed if n)
        return DataError(
            f"{split_origin(cfg, split)}: all {seen} pairs were removed by the "
            f"filters ({why})"
        )


class ParallelCorpus:
    """Token ids of a split, pieces only (no <bos>/<eos>), plus the raw references."""

    def __init__(
        self,
        src: list[list[int]],
        tgt: list[list[int]],
        refs: list[str] | None = None,
        srcs: list[str] | None = None,
    ) -> None:
        assert len(src) == len(tgt)
        self.src, self.tgt = src, tgt
        self.refs = refs or []
        self.srcs = srcs or []
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """A hash of the token ids of both sides: equal iff the batches can be."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for seqs in (self.src, self.tgt):
                flat, lengths = _flatten(seqs)
                digest.update(lengths.numpy().tobytes())
                digest.update(flat.numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.src)

    def src_lengths(self) -> list[int]:
        return [len(s) + 1 for s in self.src]  # + <eos>

    def tgt_lengths(self) -> list[int]:
        return [len(t) + 1 for t in self.tgt]  # + <bos> or <eos>


def tokenize_pairs(
    pairs: list[tuple[str, str]],
    tokenizer: Tokenizer,
    cfg: DataConfig,
    filter_pairs: bool,
    stats: FilterStats,
) -> ParallelCorpus:
    """Tokenize; for training data drop empty, over-long and unbalanced pairs."""
    src_ids = tokenizer.encode_src([s for s, _ in pairs])
    tgt_ids = tokenizer.encode_tgt([t for _, t in pairs])
    keep_src, keep_tgt, refs, srcs = [], [], [], []
    for (s_text, t_text), s, t in zip(pairs, src_ids, tgt_ids, strict=True):
        if filter_pairs:
            if not s_text.strip() or not t_text.strip() or not s or not t:
                stats.empty += 1
                continue
            if len(s) > cfg.max_length or len(t) > cfg.max_length:
                stats.too_long += 1
                continue
            if max(len(s), len(t)) > cfg.max_length_ratio * min(len(s), len(t)):
                stats.bad_ratio += 1
                continue
        stats.kept += 1
        keep_src.append(s)
        keep_tgt.append(t)
        if not filter_pairs:
            srcs.append(s_text)
            refs.append(t_text)
    return ParallelCorpus(keep_src, keep_tgt, refs, srcs)


def _cache_key(cfg: DataConfig, split: str, tokenizer: Tokenizer, train: bool) -> str:
    digest = hashlib.sha256()
    digest.update(tokenizer.hash().encode())
    settings = (
        split,
        train,
        cfg.format,
        cfg.src_lang,
        cfg.tgt_lang,
        cfg.max_length,
        cfg.max_length_ratio,
        cfg.src_field,
        cfg.tgt_field,
    )
    digest.update(repr(settings).encode())
    for path in split_files(cfg, split):
        st = path.stat()
        digest.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _flatten(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    flat = torch.tensor([i for s in seqs for i in s], dtype=torch.int32)
    return flat, lengths


def _unflatten(flat: Tensor, lengths: Tensor) -> list[list[int]]:
    return [part.tolist() for part in torch.split(flat, lengths.tolist())]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transformer_nmt"


def load_corpus(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    train: bool,
    seed: int = 0,
) -> ParallelCorpus:
    """Read and tokenize a whole split; local files are cached once tokenized.

    Training splits are filtered; evaluation splits keep every pair (and the raw
    source and reference strings for BLEU).
    """
    cache_file = None
    if cfg.format in ("text", "tsv", "jsonl"):
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        cache_file = (
            cache_dir / f"{split}-{_cache_key(cfg, split, tokenizer, train)}.pt"
        )
        if cache_file.exists():
            try:
                state = torch.load(cache_file, weights_only=True)
                corpus = ParallelCorpus(
                    _unflatten(state["src"], state["src_len"]),
                    _unflatten(state["tgt"], state["tgt_len"]),
                    state["refs"],
                    state["srcs"],
                )
                log.info("%s: %d pairs from cache %s", split, len(corpus), cache_file)
                return corpus
            except Exception as e:  # a stale or broken cache is rebuilt, not fatal
                log.warning("ignoring unreadable cache %s: %s", cache_file, e)
    pairs = list(read_pairs(cfg, split, seed))
    if not pairs:
        raise DataError(f"{split_origin(cfg, split)}: the {split!r} split is empty")
    stats = FilterStats()
    corpus = tokenize_pairs(pairs, tokenizer, cfg, train, stats)
    if train:
        stats.log(split)
    if not len(corpus):
        raise stats.nothing_kept(cfg, split)
    if cache_file is not None:
        src, src_len = _flatten(corpus.src)
        tgt, tgt_len = _flatten(corpus.tgt)
        state = dict(
            src=src,
            src_len=src_len,
            tgt=tgt,
            tgt_len=tgt_len,
            refs=corpus.refs,
            srcs=corpus.srcs,
        )
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, cache_file)
    return corpus


# --- batches ---


@dataclass
class Batch:
    """Source (B, S) with <eos>; decoder input (B, T) <bos> y; target (B, T) y <eos>."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    n_tokens: int  # real target tokens (the loss normaliser)
    n_src_tokens: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.src.to(device, non_blocking=True),
            self.tgt_in.to(device, non_blocking=True),
            self.tgt_out.to(device, non_blocking=True),
            self.n_tokens,
            self.n_src_tokens,
        )


def pad_sources(seqs: list[list[int]]) -> Tensor:
    """Pieces -> (B, S) with <eos> appended and pad on the right."""
    width = max(len(s) for s in seqs) + 1
    out = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s) + 1] = torch.tensor([*s, EOS_ID])
    return out


def collate(src: list[list[int]], tgt: list[list[int]]) -> Batch:
    width = max(len(t) for t in tgt) + 1
    tgt_in = torch.full((len(tgt), width), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((len(tgt), width), PAD_ID, dtype=torch.long)
    for i, t in enumerate(tgt):
        tgt_in[i, : len(t) + 1] = torch.tensor([BOS_ID, *t])
        tgt_out[i, : len(t) + 1] = torch.tensor([*t, EOS_ID])
    n_tokens = sum(len(t) + 1 for t in tgt)
    n_src = sum(len(s) + 1 for s in src)
    return Batch(pad_sources(src), tgt_in, tgt_out, n_tokens, n_src)


def token_batches(
    src_lengths: list[int],
    tgt_lengths: list[int],
    max_tokens: int,
    max_sentences: int = 0,
    seed: int | None = None,
) -> list[list[int]]:
    """Group sentence indices into batches within a token budget.

    Sentences are sorted by length (ties broken at random from ``seed``) and packed so
    that ``n_sentences * longest`` on either side, padding included, stays within
    ``max_tokens``. The batches are then shuffled from ``seed`` (None: keep order).
    """
    rng = random.Random(seed)
    tiebreak = [rng.random() for _ in src_lengths] if seed is not None else None
    order = sorted(
        range(len(src_lengths)),
        key=lambda i: (
            max(src_lengths[i], tgt_lengths[i]),
            src_lengths[i],
            tiebreak[i] if tiebreak else i,
        ),
    )
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        need = max(src_lengths[i], tgt_lengths[i])
        width = max(longest, need)
        full = max_sentences and len(current) >= max_sentences
        if current and (full or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current, width = [], need
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    if seed is not None:
        rng.shuffle(batches)
    return batches


def padding_efficiency(
    batches: list[list[int]], src_lengths: list[int], tgt_lengths: list[int]
) -> float:
    """Real tokens / padded tokens over both sides of all batches."""
    real = padded = 0
    for batch in batches:
        s = [src_lengths[i] for i in batch]
        t = [tgt_lengths[i] for i in batch]
        real += sum(s) + sum(t)
        padded += len(batch) * (max(s) + max(t))
    return real / padded


class BatchIterator:
    """Deterministic, resumable token batches over an in-memory corpus.

    The batches of epoch ``e`` depend only on (seed, e); ``rank``/``world`` shard them
    for data parallelism (every rank gets the same number of batches).
    """

    def __init__(
        self,
        corpus: ParallelCorpus,
        max_tokens: int,
        max_sentences: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.corpus = corpus
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world = rank, world
        self._src_len = corpus.src_lengths()
        self._tgt_len = corpus.tgt_lengths()

    def batch_indices(self, epoch: int) -> list[list[int]]:
        seed = self.seed * 100_003 + epoch if self.shuffle else None
        batches = token_batches(
            self._src_len, self._tgt_len, self.max_tokens, self.max_sentences, seed
        )
        if self.world > 1:
            usable = len(batches) - len(batches) % self.world
            batches = batches[self.rank : usable : self.world]
        return batches

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch number ``start`` on (for exact resume)."""
        for indices in self.batch_indices(epoch)[start:]:
            yield collate(
                [self.corpus.src[i] for i in indices],
                [self.corpus.tgt[i] for i in indices],
            )

    def fingerprint(self) -> str:
        return self.corpus.fingerprint()

    def efficiency(self, epoch: int = 0) -> float:
        return padding_efficiency(
            self.batch_indices(epoch), self._src_len, self._tgt_len
        )


class StreamingBatchIterator:
    """Token batches over a corpus too large for memory, read ``stream_buffer`` pairs
    at a time; each buffer is tokenized, filtered, sorted and shuffled on its own."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.seed, self.rank, self.world = seed, rank, world

    def _buffers(self) -> Iterator[list[tuple[str, str]]]:
        buffer = []
        for pair in read_pairs(self.cfg, self.cfg.train_split, self.seed):
            buffer.append(pair)
            if len(buffer) >= self.cfg.stream_buffer:
                yield buffer
                buffer = []
        if buffer:
            yield buffer

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        number = 0
        stats = FilterStats()
        for chunk_id, pairs in enumerate(self._buffers()):
            corpus = tokenize_pairs(pairs, self.tokenizer, self.cfg, True, stats)
            if not len(corpus):
                continue
            inner = BatchIterator(
                corpus,
                self.cfg.max_tokens,
                self.cfg.max_sentences,
                seed=(self.seed * 100_003 + epoch) * 1_009 + chunk_id,
                rank=self.rank,
                world=self.world,
            )
            for indices in inner.batch_indices(0):
                if number >= start:
                    yield collate(
                        [corpus.src[i] for i in indices],
                        [corpus.tgt[i] for i in indices],
                    )
                number += 1
        stats.log(f"{self.cfg.train_split} (streamed, epoch {epoch})")
        if not stats.kept:
            raise stats.nothing_kept(self.cfg, self.cfg.train_split)

    def fingerprint(self) -> str:
        """Changes with the files (size, time), the tokenizer or the filters."""
        digest = hashlib.sha256(self.tokenizer.hash().encode())
        if self.cfg.format in ("text", "tsv", "jsonl"):
            digest.update(
                _cache_key(
                    self.cfg, self.cfg.train_split, self.tokenizer, True
                ).encode()
            )
        else:
            settings = (self.cfg.format, self.cfg.hub_name, self.cfg.hub_config)
            settings += (self.cfg.max_length, self.cfg.max_length_ratio)
            digest.update(repr(settings).encode())
        return digest.hexdigest()[:16]
