"""Validation during training: loss, perplexity, accuracy, greedy BLEU / chrF."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.config import PAD_ID, Config, DecodingConfig
from transformer.data import ParallelCorpus, collate, load_corpus, token_batches
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


def load_valid(cfg: Config, tokenizer: Tokenizer) -> ParallelCorpus:
    """The validation split, unfiltered, cut to the model's positions."""
    d = cfg.data
    corpus = load_corpus(d, d.valid_split, tokenizer, seed=cfg.training.seed)
    return fit_positions(corpus, cfg.model.max_pieces(), d.valid_split)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    corpus: ParallelCorpus,
    max_tokens: int,
    device: torch.device,
    precision: str,
    chunk_rows: int = 4096,
) -> dict[str, float]:
    """Cross-entropy without smoothing per target token, perplexity, accuracy."""
    model.eval()
    loss_sum = correct = tokens = 0.0
    for indices in token_batches(
        corpus.src_lengths(), corpus.tgt_lengths(), max_tokens
    ):
        batch = collate(
            [corpus.src[i] for i in indices], [corpus.tgt[i] for i in indices]
        ).to(device)
        with autocast(device, precision):
            logits = model(batch.src, batch.tgt_in)
        loss_sum += label_smoothed_loss(logits, batch.tgt_out, 0.0, chunk_rows).item()
        real = batch.tgt_out != PAD_ID
        correct += ((logits.argmax(-1) == batch.tgt_out) & real).sum().item()
        tokens += batch.n_tokens
    loss = loss_sum / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "accuracy": correct / tokens}


def validate(
    model: nn.Module,
    corpus: ParallelCorpus,
    tokenizer: Tokenizer,
    cfg: Config,
    device: torch.device,
    hyps_file: Path | None = None,
) -> dict[str, Any]:
    """Validation loss, perplexity, accuracy and (``valid_bleu``) greedy BLEU / chrF.

    ``corpus`` must already fit the model's positions (``fit_positions``).
    """
    t = cfg.training
    precision = effective_precision(device, t.precision, "training.precision")
    metrics: dict[str, Any] = evaluate_loss(
        model, corpus, cfg.data.valid_max_tokens, device, precision, t.loss_chunk_rows
    )
    if cfg.training.valid_bleu:
        greedy = DecodingConfig(
            strategy="greedy",
            max_len_a=cfg.decoding.max_len_a,
            max_len_b=cfg.decoding.max_len_b,
            max_tokens=cfg.decoding.max_tokens,
        )
        with autocast(device, precision):
            results = decode_corpus(model, corpus.src, greedy, device)
        hyps = [tokenizer.decode_tgt(r[0].tokens) for r in results]
        metrics.update(score_corpus(hyps, corpus.refs))
        if hyps_file is not None:
            atomic_write_bytes(hyps_file, ("\n".join(hyps) + "\n").encode("utf-8"))
    return metrics
