"""Parallel corpora: reading, the tokenized corpus store, token batches.

``readers`` reads every supported format with clear errors; ``corpus`` holds the
small evaluation splits and the training filters; ``store`` writes and memory-maps
the tokenized training corpus; ``batching`` makes the token batches of each rank.
"""

from transformer.data.batching import (
    Batch,
    EpochBatches,
    TrainBatches,
    collate,
    pack,
    pad_sources,
    padding_efficiency,
    token_batches,
)
from transformer.data.corpus import (
    FilterStats,
    ParallelCorpus,
    keep_pair,
    load_corpus,
    tokenize_pairs,
)
from transformer.data.readers import (
    DataError,
    read_hub_pairs,
    read_jsonl_pairs,
    read_lines,
    read_pairs,
    read_text_pairs,
    read_tsv_pairs,
    split_files,
    split_origin,
    toy_pairs,
)
from transformer.data.store import CorpusStore, build_store, open_store, store_key

__all__ = [
    "Batch",
    "CorpusStore",
    "DataError",
    "EpochBatches",
    "FilterStats",
    "ParallelCorpus",
    "TrainBatches",
    "build_store",
    "collate",
    "keep_pair",
    "load_corpus",
    "open_store",
    "pack",
    "pad_sources",
    "padding_efficiency",
    "read_hub_pairs",
    "read_jsonl_pairs",
    "read_lines",
    "read_pairs",
    "read_text_pairs",
    "read_tsv_pairs",
    "split_files",
    "split_origin",
    "store_key",
    "toy_pairs",
    "token_batches",
    "tokenize_pairs",
]
