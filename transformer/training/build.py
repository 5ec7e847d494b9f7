"""Building a run's pieces: device, tokenizer, model and training batches."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from transformer.config import Config, ConfigError, TrainingConfig
from transformer.data import (
    BatchIterator,
    DataError,
    StreamingBatchIterator,
    load_corpus,
    read_pairs,
    split_origin,
)
from transformer.model import Transformer
from transformer.tokenizer import Tokenizer
from transformer.training.distributed import Distributed

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"training.device: {name!r} asked for but CUDA is not available"
        )
    return device


def build_device(t: TrainingConfig, ranks: Distributed) -> torch.device:
    """The device of this rank (its own GPU under DDP), set up for training."""
    device = resolve_device(t.device)
    if device.type == "cuda":
        if ranks.enabled:
            device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t.threads:
        torch.set_num_threads(t.threads)
    return device


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def build_tokenizer(cfg: Config, run_dir: Path, ranks: Distributed) -> Tokenizer:
    """Given model files, the run's own model, or one that rank 0 trains on the
    training data while the other ranks wait for it."""
    tcfg = cfg.data.tokenizer
    if tcfg.model or tcfg.src_model:
        return Tokenizer.from_files(tcfg)
    saved = run_dir / ("spm.model" if tcfg.joint else "spm.src.model")

    def train_or_load() -> Tokenizer:
        if not saved.exists():
            d = cfg.data
            pairs = list(read_pairs(d, d.train_split, cfg.training.seed))
            for side, texts in (
                ("source", [s for s, _ in pairs]),
                ("target", [t for _, t in pairs]),
            ):
                if not any(text.strip() for text in texts):
                    raise DataError(
                        f"{split_origin(d, d.train_split)}: the training corpus has "
                        f"no {side} text ({len(pairs)} pairs) to train the "
                        "tokenizer on"
                    )
            tokenizer = Tokenizer.train(
                tcfg, [s for s, _ in pairs], [t for _, t in pairs]
            )
            tokenizer.save(run_dir)
        if tcfg.joint:
            return Tokenizer((run_dir / "spm.model").read_bytes())
        return Tokenizer(
            (run_dir / "spm.src.model").read_bytes(),
            (run_dir / "spm.tgt.model").read_bytes(),
        )

    return ranks.main_first(train_or_load, "training the SentencePiece model")


def set_vocab_sizes(cfg: Config, tokenizer: Tokenizer) -> None:
    for side, size in (
        ("src", tokenizer.src_vocab_size),
        ("tgt", tokenizer.tgt_vocab_size),
    ):
        name = f"{side}_vocab_size"
        current = getattr(cfg.model, name)
        if current and current != size:
            raise ConfigError(
                f"model.{name}: {current} but the tokenizer has {size} pieces "
                "(leave it at 0 to take the tokenizer's size)"
            )
        setattr(cfg.model, name, size)
    if not tokenizer.joint and cfg.model.tie_src_tgt_embeddings:
        raise ConfigError(
            "model.tie_src_tgt_embeddings: needs a joint tokenizer "
            "(data.tokenizer.joint: true)"
        )
    cfg.model.validate()


def build_model(
    cfg: Config, device: torch.device, ranks: Distributed
) -> tuple[Transformer, torch.nn.Module]:
    """The model, and the module the training step calls (DDP and/or compiled)."""
    torch.manual_seed(cfg.training.seed)
    model = Transformer(cfg.model).to(device)
    train_model: torch.nn.Module = model
    if ranks.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.training.compile:
        train_model = torch.compile(train_model)
    return model, train_model


def build_train_data(
    cfg: Config, tokenizer: Tokenizer, ranks: Distributed
) -> tuple[BatchIterator | StreamingBatchIterator, int]:
    """This rank's training batches and the number of training pairs (-1 when
    streamed). Rank 0 tokenizes and caches first; the others read its cache."""
    d, t = cfg.data, cfg.training
    if d.streaming:
        return StreamingBatchIterator(d, tokenizer, t.seed, ranks.rank, ranks.world), -1
    corpus = ranks.main_first(
        lambda: load_corpus(d, d.train_split, tokenizer, train=True, seed=t.seed),
        "tokenizing the training corpus",
    )
    iterator = BatchIterator(
        corpus,
        d.max_tokens,
        d.max_sentences,
        t.seed,
        rank=ranks.rank,
        world=ranks.world,
    )
    log.info("padding efficiency: %.3f", iterator.efficiency(0))
    return iterator, len(corpus)
