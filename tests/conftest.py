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
