"""Building a run's pieces: device, tokenizer, model and training batches."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from transformer.allocator import bound_kernel_caches, reuse_freed_memory
from transformer.config import Config, ConfigError, TrainingConfig
from transformer.data import (
    CorpusStore,
    TrainBatches,
    open_store,
    split_origin,
)
from transformer.data.languages import Direction, direction, temperature_factors
from transformer.data.resegment import Resegmenter
from transformer.loading import resolve_device
from transformer.models import create_model
from transformer.tokenizer import Tokenizer
from transformer.training.distributed import Distributed

log = logging.getLogger(__name__)


def run_dir_of(cfg: Config) -> Path:
    """The run's folder (created)."""
    run_dir = Path(cfg.training.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def build_device(t: TrainingConfig, ranks: Distributed) -> torch.device:
    """The device of this rank (its own GPU under DDP), set up for training."""
    device = resolve_device(t.device, "training.device")
    if device.type == "cuda":
        if ranks.enabled:
            device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        reuse_freed_memory()  # no page faults on each step's large tensors
        bound_kernel_caches()  # bf16 kernels: those of recent shapes kept, bounded
    if t.threads:
        torch.set_num_threads(t.threads)
    return device


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
    corpora = d.train_corpora()
    weights = [weight for _, _, weight in corpora]
    ways = [direction(d, tokenizer, c.src_lang, c.tgt_lang) for c, _, _ in corpora]
    if any(c.tagged() for c, _, _ in corpora):  # tagged back-translation
        if tokenizer.bt_id is None:
            raise ConfigError(
                "data.bt_tag: a back-translated corpus is tagged with <BT>, which "
                "this tokenizer does not reserve (train one with this config, or "
                "set bt_tag: false)"
            )
        ways = [
            dataclasses.replace(w, prefix=(tokenizer.bt_id, *w.prefix))
            if c.tagged()
            else w
            for w, (c, _, _) in zip(ways, corpora, strict=True)
        ]
    if d.multilingual:
        weights = direction_weights(stores, weights, ways, d.sampling_temperature)
    data = TrainBatches(
        stores,
        weights,
        d.max_tokens,
        d.max_sentences,
        t.seed,
        rank=ranks.rank,
        world=ranks.world,
        workers=d.workers,
        pin_memory=device.type == "cuda",
        directions=ways,
        resegment=_resegmenter(cfg, tokenizer),
    )
    log.info("training data: %d pairs in %d corpus store(s)", data.n_pairs, len(stores))
    return data


def direction_weights(
    stores: list[CorpusStore],
    weights: list[float],
    ways: list[Direction],
    temperature: float,
) -> list[float]:
    """Each store's weight times its direction's share at ``temperature``
    (``data.sampling_temperature``), sizes counted with the corpus weights."""
    names = [way.name for way in ways]
    order = list(dict.fromkeys(names))
    sizes = [
        sum(
            w * len(s) for s, w, n in zip(stores, weights, names, strict=True) if n == d
        )
        for d in order
    ]
    factors = dict(zip(order, temperature_factors(sizes, temperature), strict=True))
    out = [w * factors[n] for w, n in zip(weights, names, strict=True)]
    for name, size in zip(order, sizes, strict=True):
        log.info(
            "direction %s: %d pairs, %.3g of them an epoch (temperature %g)",
            name,
            size,
            size * factors[name],
            temperature,
        )
    return out


def _resegmenter(cfg: Config, tokenizer: Tokenizer) -> Resegmenter | None:
    """Subword regularization's sampler (``data.tokenizer.sampling_alpha``)."""
    tcfg = cfg.data.tokenizer
    if not tcfg.sampling_alpha:
        return None
    log.info(
        "subword regularization: alpha %g, nbest %d, %s",
        tcfg.sampling_alpha,
        tcfg.sampling_nbest,
        tcfg.sampling_sides,
    )
    return Resegmenter(
        tokenizer,
        tcfg.sampling_alpha,
        tcfg.sampling_nbest,
        tcfg.sampling_sides,
        cfg.data.max_length,
        cfg.training.seed,
    )
