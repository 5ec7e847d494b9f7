"""Shared fixtures: tiny seeded models and the location of the real corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transformer.config import ModelConfig
from transformer.model import Transformer

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        src_vocab_size=23,
        tgt_vocab_size=23,
        d_model=32,
        n_heads=4,
        encoder_layers=2,
        decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        max_positions=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


@pytest.fixture
def multi30k_dir() -> Path:
    if not (MULTI30K / "train.de.gz").exists():
        pytest.skip(f"Multi30k not found at {MULTI30K} (the shared corpus is absent)")
    return MULTI30K


def train_copy_model(
    steps: int, seed: int = 0, vocab: int = 14, **overrides
) -> Transformer:
    """A small model trained for ``steps`` updates on the copy task (ids 4..vocab-1).

    ``overrides`` change the architecture (``tiny_config`` keys); with different
    source and target vocabularies the copied ids are those both have.
    """
    torch.manual_seed(seed)
    values = dict(
        d_model=64,
        d_ff=128,
        max_positions=48,
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
    )
    cfg = tiny_config(**{**values, **overrides})
    model = Transformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    shared = min(cfg.src_vocab_size, cfg.tgt_vocab_size)
    for _ in range(steps):
        length = int(torch.randint(3, 9, (1,)))
        body = torch.randint(4, shared, (64, length))
        src = torch.cat([body, torch.full((64, 1), 3)], 1)
        tgt_in = torch.cat([torch.full((64, 1), 2), body], 1)
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), src.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def half_trained() -> Transformer:
    """Partly trained: outputs vary with the input and end at different lengths."""
    return train_copy_model(120)
