"""The architectures, one module each, behind one protocol (``models.common``):
the Transformer encoder-decoder, an RNN encoder-decoder with soft, hard or no
attention, and a decoder-only (GPT-style) translator; and ``Ensemble``, several
of them decoded as one."""

from __future__ import annotations

from torch import nn

from transformer.config import ModelConfig
from transformer.models.common import check_ids, count_parameters
from transformer.models.ensemble import Ensemble
from transformer.models.transformer import Memory, Transformer

__all__ = [
    "Ensemble",
    "Memory",
    "Transformer",
    "create_model",
    "check_ids",
    "count_parameters",
]


def create_model(cfg: ModelConfig) -> nn.Module:
    """The architecture ``cfg.arch`` names, randomly initialised."""
    if cfg.arch == "rnn":
        from transformer.models.rnn import RNNSeq2Seq

        return RNNSeq2Seq(cfg)
    if cfg.arch == "decoder_only":
        from transformer.models.decoder_only import DecoderOnly

        return DecoderOnly(cfg)
    return Transformer(cfg)
