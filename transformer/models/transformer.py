"""The encoder-decoder Transformer: encode(), decode(..., cache) and forward()."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transformer import linear
from transformer.attention import MultiHeadAttention, padding_mask
from transformer.cache import KVCache
from transformer.config import ModelConfig
from transformer.embeddings import PositionalEncoding
from transformer.layers import DecoderLayer, Dropout, EncoderLayer
from transformer.models.common import check_ids, output_projection, token_embeddings


@dataclass
class Memory:
    """Encoder output: ``states`` (B, S, D) and ``mask`` (B, S), True at real tokens."""

    states: Tensor
    mask: Tensor

    def index_select(self, index: Tensor) -> Memory:
        return Memory(
            self.states.index_select(0, index), self.mask.index_select(0, index)
        )


class Transformer(nn.Module):
    """The Transformer of "Attention Is All You Need" for sequence-to-sequence tasks.

    Args:
        cfg: the architecture; vocabulary sizes must be set (> 0).

    Shape:
        src: (B, S) source ids padded with ``cfg.pad_id``.
        tgt: (B, T) target ids, starting with <bos> for teacher forcing.
        logits: (B, T, V_tgt).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tgt_embed, self.src_embed = token_embeddings(cfg)
        learned = cfg.positional == "learned"
        self.src_pos = PositionalEncoding(cfg.max_positions, cfg.d_model, learned)
        self.tgt_pos = PositionalEncoding(cfg.max_positions, cfg.d_model, learned)
        self.dropout = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(
            EncoderLayer(cfg) for _ in range(cfg.encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(cfg) for _ in range(cfg.decoder_layers)
        )
        # pre-norm needs a final LayerNorm; post-norm outputs are already normalised
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else None
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else None
        self.output_proj = output_projection(cfg)
        if cfg.final_logits_bias:  # loaded with the weights; training leaves it be
            self.register_buffer("final_logits_bias", torch.zeros(cfg.tgt_vocab_size))
        else:
            self.final_logits_bias = None
        self._init_linear_layers()

    def _init_linear_layers(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.output_proj:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, src: Tensor) -> Memory:
        """(B, S) source ids -> ``Memory`` with states (B, S, D)."""
        check_ids(src, self.cfg.src_vocab_size, "source")
        mask = padding_mask(src, self.cfg.pad_id)  # (B, S)
        x = self.dropout(self.src_pos(self.src_embed(src)))
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder:
            x = layer(x, attn_mask)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return Memory(x, mask)

    def decode(
        self, tgt: Tensor, memory: Memory, cache: KVCache | None = None
    ) -> Tensor:
        """Target ids -> next-token logits (B, T, V).

        Without a cache, ``tgt`` is the whole prefix. With one, ``tgt`` holds only the
        new positions; the cache supplies the past (and, after the first call, the
        source mask and cross-attention K/V) and is extended in place.
        """
        check_ids(tgt, self.cfg.tgt_vocab_size, "target")
        offset = 0
        memory_mask = memory.mask
        if cache is not None:
            if not cache.layers:
                cache.layers = KVCache.empty(len(self.decoder)).layers
            if cache.memory_mask is None:
                cache.memory_mask = memory.mask
            memory_mask = cache.memory_mask
            offset = cache.length
        x = self.dropout(self.tgt_pos(self.tgt_embed(tgt), offset))
        attn_mask = memory_mask[:, None, None, :]  # (B, 1, 1, S)
        for i, layer in enumerate(self.decoder):
            x = layer(
                x, memory.states, attn_mask, None if cache is None else cache.layers[i]
            )
        if cache is not None:
            cache.length += tgt.size(1)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.project(x)

    def project(self, x: Tensor) -> Tensor:
        """Decoder states (B, T, D) -> logits (B, T, V)."""
        if self.output_proj is None:  # tied: the embedding is the output layer
            return linear.linear(x, self.tgt_embed.weight, self.final_logits_bias)
        # a module of its own (untied, or int8: a quantized layer has no .weight tensor)
        logits = linear.apply(self.output_proj, x)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced training: all target positions in parallel, (B, T, V)."""
        return self.decode(tgt_in, self.encode(src))

    def target_positions(self, src: Tensor) -> Tensor:
        """(B, S) sources -> (B,) target positions available to each sentence."""
        return torch.full_like(src[:, 0], self.cfg.max_positions)

    def new_cache(self) -> KVCache:
        return KVCache.empty(len(self.decoder))

    @torch.no_grad()
    def alignment(self, src: Tensor, tgt: Tensor, layer: int = -1) -> Tensor:
        """Teacher-force ``tgt`` (1, T) and return decoder layer ``layer``'s
        cross-attention (H, T, S): row t is the query that predicts token t + 1."""
        n = len(self.decoder)
        if not -n <= layer < n:
            raise ValueError(f"layer must be in [{-n}, {n - 1}]")
        self.record_attention(True)
        try:
            self(src, tgt)
            weights = self.decoder[layer].cross_attn.weights  # (1, H, T, S)
        finally:
            self.record_attention(False)
        return weights[0]

    def record_attention(self, enabled: bool = True) -> None:
        """Switch every attention module to the reference path that keeps weights."""
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.record_weights = enabled
                module.weights = None
