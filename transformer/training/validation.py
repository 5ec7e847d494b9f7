"""Validation during training: loss, perplexity, accuracy, greedy BLEU / chrF."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.config import BOS_ID, PAD_ID, Config, DecodingConfig
from transformer.data import ParallelCorpus, collate, load_corpus, token_batches
from transformer.data.languages import Direction, direction
from transformer.evaluation import score_corpus
from transformer.files import atomic_write_bytes
from transformer.precision import autocast, effective_precision
from transformer.search import decode_corpus
from transformer.tokenizer import Tokenizer
from transformer.training.loss import label_smoothed_loss

log = logging.getLogger(__name__)


def fit_positions(corpus: ParallelCorpus, limit: int, name: str) -> ParallelCorpus:
    """Cut sentences to the model's positions (one is kept for <bos> / <eos>), with
    a warning: an evaluation set is never filtered, and must never crash the run.
    The raw references stay whole, so BLEU still counts what was cut."""
    long = sum(
        len(s) > limit or len(t) > limit
        for s, t in zip(corpus.src, corpus.tgt, strict=True)
    )
    if not long:
        return corpus
    log.warning(
        "%s: %d sentence pair(s) longer than the model's %d pieces "
        "were truncated for validation",
        name,
        long,
        limit,
    )
    return ParallelCorpus(
        [s[:limit] for s in corpus.src],
        [t[:limit] for t in corpus.tgt],
        corpus.refs,
        corpus.srcs,
    )


@dataclass
class ValidSet:
    """The validation split of one direction, tokenized (with its tag)."""

    way: Direction
    corpus: ParallelCorpus


def load_valid(cfg: Config, tokenizer: Tokenizer) -> list[ValidSet]:
    """The validation split of each direction, unfiltered, cut to the model's
    positions (a source tag counts)."""
    d = cfg.data
    sets = []
    for src, tgt in d.directions():
        way = direction(d, tokenizer, src, tgt)
        data = d.direction(src, tgt) if d.multilingual else d
        corpus = load_corpus(data, d.valid_split, tokenizer, seed=cfg.training.seed)
        limit = cfg.model.max_pieces() - len(way.prefix)
        name = d.valid_split + (f" ({way.name})" if d.multilingual else "")
        corpus = fit_positions(corpus, limit, name)
        corpus.src = [[*way.prefix, *s] for s in corpus.src]
        sets.append(ValidSet(way, corpus))
    return sets


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    corpus: ParallelCorpus,
    max_tokens: int,
    device: torch.device,
    precision: str,
    chunk_rows: int = 4096,
    bos: int = BOS_ID,
) -> dict[str, float]:
    """Cross-entropy without smoothing per target token, perplexity, accuracy;
    ``bos``: the decoder's first input."""
    model.eval()
    loss_sum = correct = tokens = 0.0
    for indices in token_batches(
        corpus.src_lengths(), corpus.tgt_lengths(), max_tokens
    ):
        batch = collate(
            [corpus.src[i] for i in indices], [corpus.tgt[i] for i in indices], bos
        ).to(device)
        with autocast(device, precision):
            logits = model(batch.src, batch.tgt_in)
        loss_sum += label_smoothed_loss(logits, batch.tgt_out, 0.0, chunk_rows).item()
        real = batch.tgt_out != PAD_ID
        correct += ((logits.argmax(-1) == batch.tgt_out) & real).sum().item()
        tokens += batch.n_tokens
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "accuracy": correct / tokens,
        "tokens": tokens,
    }


def _validate_one(
    model: nn.Module,
    valid: ValidSet,
    tokenizer: Tokenizer,
    cfg: Config,
    device: torch.device,
    precision: str,
    hyps_file: Path | None,
) -> dict[str, Any]:
    t, corpus = cfg.training, valid.corpus
    metrics: dict[str, Any] = evaluate_loss(
        model,
        corpus,
        cfg.data.valid_max_tokens,
        device,
        precision,
        t.loss_chunk_rows,
        valid.way.bos,
    )
    if t.valid_bleu:
        greedy = DecodingConfig(
            strategy="greedy",
            max_len_a=cfg.decoding.max_len_a,
            max_len_b=cfg.decoding.max_len_b,
            max_tokens=cfg.decoding.max_tokens,
        )
        with autocast(device, precision):
            results = decode_corpus(
                model,
                corpus.src,
                greedy,
                device,
                bos=valid.way.bos,
                banned=valid.way.banned,
            )
        hyps = [tokenizer.decode_tgt(r[0].tokens) for r in results]
        metrics.update(score_corpus(hyps, corpus.refs))
        if hyps_file is not None:
            atomic_write_bytes(hyps_file, ("\n".join(hyps) + "\n").encode("utf-8"))
    return metrics


def validate(
    model: nn.Module,
    sets: list[ValidSet],
    tokenizer: Tokenizer,
    cfg: Config,
    device: torch.device,
    hyps_file: Path | None = None,
) -> dict[str, Any]:
    """Validation loss, perplexity, accuracy and (``valid_bleu``) greedy BLEU /
    chrF. With several directions each has its own under ``"<src>-<tgt>/..."``
    (and its own hypotheses file, ``valid_hyps.<src>-<tgt>.txt``); the plain keys
    are the mean over directions (the loss per token over all of them), or the
    one direction ``training.best_direction`` names.

    ``sets`` come from ``load_valid``.
    """
    precision = effective_precision(
        device, cfg.training.precision, "training.precision"
    )
    if len(sets) == 1:
        metrics = _validate_one(
            model, sets[0], tokenizer, cfg, device, precision, hyps_file
        )
        metrics.pop("tokens")
        return metrics
    per: dict[str, dict[str, Any]] = {}
    for valid in sets:
        name = valid.way.name
        where = None
        if hyps_file is not None:
            where = hyps_file.with_name(f"{hyps_file.stem}.{name}{hyps_file.suffix}")
        per[name] = _validate_one(
            model, valid, tokenizer, cfg, device, precision, where
        )
    metrics: dict[str, Any] = {}
    chosen = cfg.training.best_direction
    if chosen is not None:
        metrics.update({k: v for k, v in per[chosen].items() if k != "tokens"})
    else:
        tokens = sum(m["tokens"] for m in per.values())
        loss = sum(m["loss"] * m["tokens"] for m in per.values()) / tokens
        metrics["loss"] = loss
        metrics["ppl"] = math.exp(min(loss, 50))
        metrics["accuracy"] = (
            sum(m["accuracy"] * m["tokens"] for m in per.values()) / tokens
        )
        for key in ("bleu", "chrf", "bleu_lc"):
            if all(key in m for m in per.values()):
                metrics[key] = sum(m[key] for m in per.values()) / len(per)
    for name, m in per.items():
        for key, value in m.items():
            if key != "tokens" and not key.endswith("signature"):
                metrics[f"{name}/{key}"] = value
    first = next(iter(per.values()))
    for key in ("bleu_signature", "chrf_signature", "bleu_lc_signature"):
        if key in first:
            metrics[key] = first[key]
    return metrics
