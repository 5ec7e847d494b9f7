"""Tokenized pairs in memory for the small splits (validation, test), and the
training filters with their counts (shared with the corpus store)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformer.config import DataConfig
from transformer.data.readers import DataError, read_pairs, split_origin
from transformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class FilterStats:
    """What the training filters kept and dropped, and why."""

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


def keep_pair(
    s_text: str, t_text: str, s: list[int], t: list[int], cfg: DataConfig
) -> str | None:
    """None when a training pair passes the filters, else the filter that drops
    it: ``empty``, ``too_long`` or ``bad_ratio`` (checked in that order)."""
    if not s_text.strip() or not t_text.strip() or not s or not t:
        return "empty"
    if len(s) > cfg.max_length or len(t) > cfg.max_length:
        return "too_long"
    if max(len(s), len(t)) > cfg.max_length_ratio * min(len(s), len(t)):
        return "bad_ratio"
    return None


class ParallelCorpus:
    """Token ids of a split, pieces only (no <bos>/<eos>), plus the raw texts."""

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
    """Tokenize; with ``filter_pairs`` drop what ``keep_pair`` drops."""
    src_ids = tokenizer.encode_src([s for s, _ in pairs])
    tgt_ids = tokenizer.encode_tgt([t for _, t in pairs])
    keep_src, keep_tgt, refs, srcs = [], [], [], []
    for (s_text, t_text), s, t in zip(pairs, src_ids, tgt_ids, strict=True):
        if filter_pairs:
            why = keep_pair(s_text, t_text, s, t, cfg)
            if why is not None:
                setattr(stats, why, getattr(stats, why) + 1)
                continue
        stats.kept += 1
        keep_src.append(s)
        keep_tgt.append(t)
        srcs.append(s_text)
        refs.append(t_text)
    return ParallelCorpus(keep_src, keep_tgt, refs, srcs)


def load_corpus(
    cfg: DataConfig, split: str, tokenizer: Tokenizer, seed: int = 0
) -> ParallelCorpus:
    """Read and tokenize a whole evaluation split (unfiltered: every pair counts,
    with its raw source and reference for BLEU). Training data goes through the
    corpus store instead (``transformer.data.store``)."""
    pairs = list(read_pairs(cfg, split, seed))
    if not pairs:
        raise DataError(f"{split_origin(cfg, split)}: the {split!r} split is empty")
    return tokenize_pairs(pairs, tokenizer, cfg, False, FilterStats())
