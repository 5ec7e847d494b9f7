"""Building a run's pieces: device, tokenizer, model and training batches."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.allocator import reuse_freed_memory
from transformer.checkpoint import same_tokenizer
from transformer.config import Config, ConfigError, TrainingConfig
from transformer.data import (
    CorpusStore,
    DataError,
    TrainBatches,
    open_store,
    read_pairs,
    split_origin,
)
from transformer.data.store import corpus_identity
from transformer.files import atomic_write_bytes
from transformer.models import create_model
from transformer.tokenizer import Tokenizer
from transformer.training.distributed import Distributed

log = logging.getLogger(__name__)


def resolve_device(name: str, option: str = "training.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{option}: {name!r} is not a device (auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: {name!r} asked for but CUDA is not available")
    return device


def run_dir_of(cfg: Config) -> Path:
    """The run's folder (created); the corpus stores default to its ``cache``."""
    run_dir = Path(cfg.training.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(run_dir / "cache")
    return run_dir


def build_device(t: TrainingConfig, ranks: Distributed) -> torch.device:
    """The device of this rank (its own GPU under DDP), set up for training."""
    device = resolve_device(t.device)
    if device.type == "cuda":
        if ranks.enabled:
            device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        reuse_freed_memory()  # no page faults on each step's large tensors
    if t.threads:
        torch.set_num_threads(t.threads)
    return device


def sample_pairs(cfg: Config) -> tuple[list[str], list[str], int]:
    """At most ``data.tokenizer.sample_sentences`` pairs drawn uniformly from all
    training corpora, read in a stream (reservoir sampling, seeded); also returns
    how many pairs were read."""
    size = cfg.data.tokenizer.sample_sentences
    rng = random.Random(cfg.training.seed)
    sample: list[tuple[str, str]] = []
    seen = 0
    for settings, split, _ in cfg.data.train_corpora():
        for pair in read_pairs(settings, split, cfg.training.seed):
            seen += 1
            if len(sample) < size:
                sample.append(pair)
            else:
                j = rng.randrange(seen)
                if j < size:
                    sample[j] = pair
    return [s for s, _ in sample], [t for _, t in sample], seen


def check_resumed_tokenizer(cfg: Config, saved: dict, last: Path) -> None:
    """A resumed run keeps its own tokenizer: a config naming other model files
    is refused rather than recorded in config.yaml while being ignored."""
    tcfg = cfg.data.tokenizer
    if not (tcfg.model or tcfg.src_model):
        return
    if not same_tokenizer(Tokenizer.from_files(tcfg).state_dict(), saved):
        files = tcfg.model or f"{tcfg.src_model}, {tcfg.tgt_model}"
        raise ConfigError(
            f"data.tokenizer: {files} is not the tokenizer {last} was trained with; "
            "a resumed run keeps its own (drop the setting, or start a new "
            "training.run_dir)"
        )


TOKENIZER_RECORD = "spm.json"  # beside the run's own SentencePiece model


def tokenizer_record(cfg: Config) -> dict[str, Any]:
    """What the run's own SentencePiece model is trained from: the
    ``data.tokenizer`` settings, the training corpora (by content) and the seed
    that draws the sample."""
    tcfg = cfg.data.tokenizer
    cache = cfg.data.cache_dir or "cache"
    return {
        "joint": tcfg.joint,
        "vocab_size": tcfg.vocab_size,
        "model_type": tcfg.model_type,
        "character_coverage": tcfg.character_coverage,
        "sample_sentences": tcfg.sample_sentences,
        "seed": cfg.training.seed,
        "corpora": [
            [split, corpus_identity(d, split, cfg.training.seed, cache)]
            for d, split, _ in cfg.data.train_corpora()
        ],
    }


RECORD_KEYS = {"seed": "training.seed", "corpora": "the training corpora (data)"}


def tokenizer_differences(record: Path, wanted: dict[str, Any]) -> list[str] | None:
    """How the record of a run folder's SentencePiece model differs from what
    this config would train; None when there is no record (an older run)."""
    if not record.exists():
        return None
    try:
        trained = json.loads(record.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{record}: unreadable ({e}); delete it") from None
    if not isinstance(trained, dict):
        raise DataError(f"{record}: not a record of tokenizer settings; delete it")
    changed = []
    for key, value in wanted.items():
        if trained.get(key) == value:
            continue
        name = RECORD_KEYS.get(key, f"data.tokenizer.{key}")
        if key == "corpora":
            changed.append(f"{name}: other content")
        else:
            changed.append(
                f"{name}: trained with {trained.get(key)!r}, the config says {value!r}"
            )
    return changed


def _own_model(run_dir: Path, cfg: Config) -> Path:
    """The SentencePiece model a run trains for itself (the source one when
    source and target have their own)."""
    return run_dir / ("spm.model" if cfg.data.tokenizer.joint else "spm.src.model")


def saved_tokenizer_is_current(cfg: Config, run_dir: Path) -> bool:
    """Is the run folder's SentencePiece model the one this config would train
    (by its record)? Then a fresh run in the folder keeps it."""
    if not _own_model(run_dir, cfg).exists():
        return False
    try:
        changed = tokenizer_differences(
            run_dir / TOKENIZER_RECORD, tokenizer_record(cfg)
        )
    except DataError:
        return False
    return changed == []


def build_tokenizer(cfg: Config, run_dir: Path, ranks: Distributed) -> Tokenizer:
    """Given model files, the run's own model, or one that rank 0 trains on a
    sample of the training data while the other ranks wait for it."""
    tcfg = cfg.data.tokenizer
    if tcfg.model or tcfg.src_model:
        return Tokenizer.from_files(tcfg)
    saved = _own_model(run_dir, cfg)
    record = run_dir / TOKENIZER_RECORD

    def train_or_load() -> Tokenizer:
        wanted = tokenizer_record(cfg)
        changed = tokenizer_differences(record, wanted) if saved.exists() else None
        if changed:
            raise DataError(
                f"{saved} was trained with other settings ({'; '.join(changed)}): "
                "restore them, or delete it to train a new one (transformer-train "
                "--overwrite does)"
            )
        if not saved.exists():
            src, tgt, seen = sample_pairs(cfg)
            for side, texts in (("source", src), ("target", tgt)):
                if not any(text.strip() for text in texts):
                    origins = ", ".join(
                        split_origin(d, split)
                        for d, split, _ in cfg.data.train_corpora()
                    )
                    raise DataError(
                        f"{origins}: the training corpus has no {side} text "
                        f"({seen} pairs) to train the tokenizer on"
                    )
            log.info("tokenizer: training on %d of %d pairs", len(src), seen)
            trained = Tokenizer.train(tcfg, src, tgt)
            got = max(trained.src_vocab_size, trained.tgt_vocab_size)
            if got < tcfg.vocab_size:
                log.warning(
                    "data.tokenizer.vocab_size: %d asked for, the corpus gave %d "
                    "pieces",
                    tcfg.vocab_size,
                    got,
                )
            atomic_write_bytes(record, (json.dumps(wanted, indent=1) + "\n").encode())
            trained.save(run_dir)  # after the record: a model is never unrecorded
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
) -> tuple[nn.Module, torch.nn.Module]:
    """The model, and the module the training step calls (DDP when distributed;
    the trainer compiles the whole forward + loss with ``training.compile``)."""
    torch.manual_seed(cfg.training.seed)
    model = create_model(cfg.model).to(device)
    train_model: torch.nn.Module = model
    if ranks.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model, train_model


def build_stores(
    cfg: Config, tokenizer: Tokenizer, progress: bool = True
) -> list[CorpusStore]:
    """The store of each training corpus, built where missing."""
    cache = cfg.data.cache_dir or "cache"
    stores = [
        open_store(settings, split, tokenizer, cache, cfg.training.seed, progress)
        for settings, split, _ in cfg.data.train_corpora()
    ]
    first: dict[str, int] = {}
    corpora = cfg.data.train_corpora()
    for i, store in enumerate(stores):
        if store.key in first:  # the key follows content: a copy is the same
            j = first[store.key]
            log.warning(
                "data.train[%d] (%s) is the same corpus as data.train[%d] (%s): it "
                "is read twice; to upsample a corpus give its entry a weight",
                i,
                split_origin(corpora[i][0], corpora[i][1]),
                j,
                split_origin(corpora[j][0], corpora[j][1]),
            )
        first.setdefault(store.key, i)
    return stores


def build_train_data(
    cfg: Config, tokenizer: Tokenizer, ranks: Distributed, device: torch.device
) -> TrainBatches:
    """This rank's training batches. Rank 0 builds the corpus stores that are
    missing while the other ranks wait; then every rank maps them."""
    d, t = cfg.data, cfg.training
    stores = ranks.main_first(
        lambda: build_stores(cfg, tokenizer, progress=ranks.main),
        "building the corpus store",
    )
    data = TrainBatches(
        stores,
        [weight for _, _, weight in d.train_corpora()],
        d.max_tokens,
        d.max_sentences,
        t.seed,
        rank=ranks.rank,
        world=ranks.world,
        workers=d.workers,
        pin_memory=device.type == "cuda",
    )
    log.info("training data: %d pairs in %d corpus store(s)", data.n_pairs, len(stores))
    return data
