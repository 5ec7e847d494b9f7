"""The decoder-only (GPT-style) translator: one causal Transformer stack over the
source and the target as one sequence.

The sequence is ``source <eos> <bos> target``: the source as the encoder-decoder
models read it (ending in <eos>), then the decoder input, whose <bos> is the
separator that says "translate now". Every position attends to the real
(non-pad) positions at or before it; source padding sits between the source and
the target and is never attended, and each row's target positions continue from
its own source length, so padding changes no output. The loss covers the target
positions only: ``forward`` returns their logits and no others.

Decoding encodes the source prefix in one pass (``encode``: the stack's keys and
values at every layer), then extends it token by token with the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from transformer import linear
from transformer.attention import causal_mask, padding_mask
from transformer.cache import LayerCache
from transformer.config import ModelConfig
from transformer.dropout import Dropout
from transformer.embeddings import PositionalEncoding
from transformer.layers import EncoderLayer
from transformer.models.common import check_ids, output_projection, token_embeddings


def _check_positions(positions: Tensor, max_positions: int) -> None:
    """Source and target together must fit ``max_positions``: a ``ValueError``
    on CPU in eager mode, a device-side assert elsewhere (as ``check_ids``)."""
    fits = (positions < max_positions).all()
    message = (
        f"source and target need more than model.max_positions={max_positions} "
        "positions (a decoder_only model reads both in one sequence)"
    )
    if positions.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(fits, message)
    elif not fits:
        raise ValueError(message)


@dataclass
class PrefixMemory:
    """The encoded source: ids (B, S), mask (B, S) True at real tokens, lengths
    (B,), and each layer's keys and values (B, H, S, Dh)."""

    src: Tensor
    mask: Tensor
    lengths: Tensor
    kv: list[tuple[Tensor, Tensor]]

    def index_select(self, index: Tensor) -> PrefixMemory:
        return PrefixMemory(
            self.src.index_select(0, index),
            self.mask.index_select(0, index),
            self.lengths.index_select(0, index),
            [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv],
        )


@dataclass
class PrefixCache:
    """Decoding state: per layer, the keys/values of the source prefix and the
    target so far (one row per hypothesis; ``LayerCache`` applies reorders
    lazily); ``key_mask`` (B', S + T) True at attendable keys; ``positions`` (B',)
    the position of the next target token."""

    layers: list[LayerCache] = field(default_factory=list)
    key_mask: Tensor | None = None
    positions: Tensor | None = None
    length: int = 0

    def reorder(
        self, index: Tensor, sources: Tensor | None = None, keep_sources: bool = False
    ) -> None:
        """Keep rows ``index``. The prefix is part of each row's own keys, so it
        follows ``index`` whatever ``sources`` says."""
        for layer in self.layers:
            layer.select(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
            self.positions = self.positions.index_select(0, index)


class DecoderOnly(nn.Module):
    """A causal Transformer that translates by continuing its source
    (``model.arch: decoder_only``; ``decoder_layers`` layers).

    Shape:
        src: (B, S) source ids padded with ``cfg.pad_id``.
        tgt: (B, T) target ids, starting with <bos> for teacher forcing.
        logits: (B, T, V_tgt), for the target positions only.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tgt_embed, self.src_embed = token_embeddings(cfg)
        learned = cfg.positional == "learned"
        self.pos = PositionalEncoding(cfg.max_positions, d, learned)
        self.dropout = Dropout(cfg.dropout)
        # the encoder's layer under a causal mask, with the cache of ``decode``
        self.layers = nn.ModuleList(
            EncoderLayer(cfg) for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(d) if cfg.norm_first else None
        self.output_proj = output_projection(cfg)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.output_proj:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _source(self, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embedded source (B, S, D), its mask (B, S) and lengths (B,)."""
        check_ids(src, self.cfg.src_vocab_size, "source")
        mask = padding_mask(src, self.cfg.pad_id)
        x = self.pos(self.src_embed(src))
        return self.dropout(x), mask, mask.sum(1)

    def _target(self, tgt: Tensor, first: Tensor) -> Tensor:
        """Embedded target (B, T, D) at positions ``first`` (B,) onwards."""
        check_ids(tgt, self.cfg.tgt_vocab_size, "target")
        steps = torch.arange(tgt.size(1), device=tgt.device)
        positions = first[:, None] + steps  # (B, T)
        _check_positions(positions, self.cfg.max_positions)
        return self.dropout(self.pos.at(self.tgt_embed(tgt), positions))

    def _output(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.output_proj is None:
            return linear.linear(x, self.tgt_embed.weight)
        return linear.apply(self.output_proj, x)

    def encode(self, src: Tensor) -> PrefixMemory:
        """Run the source prefix once: (B, S) ids -> ``PrefixMemory``."""
        x, mask, lengths = self._source(src)
        s = src.size(1)
        attn = causal_mask(s, s, src.device) & mask[:, None, None, :]  # (B,1,S,S)
        caches = [LayerCache() for _ in self.layers]
        for layer, layer_cache in zip(self.layers, caches, strict=True):
            x = layer(x, attn, layer_cache)  # keeps the source's K/V in the cache
        kv = [(c.self_k, c.self_v) for c in caches]
        return PrefixMemory(src, mask, lengths, kv)

    def _full(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Source and target in one pass -> the target positions' logits."""
        xs, mask, lengths = self._source(src)
        x = torch.cat([xs, self._target(tgt, lengths)], dim=1)  # (B, S + T, D)
        n = x.size(1)
        keys = torch.cat([mask, mask.new_ones(tgt.shape)], dim=1)  # (B, S + T)
        attn = causal_mask(n, n, src.device) & keys[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn)
        return self._output(x[:, src.size(1) :])

    def decode(
        self, tgt: Tensor, memory: PrefixMemory, cache: PrefixCache | None = None
    ) -> Tensor:
        """Target ids -> next-token logits (B, T, V).

        Without a cache, ``tgt`` is the whole prefix and source and target run
        again from scratch. With one, ``tgt`` holds only the new positions.
        """
        if cache is None:
            return self._full(memory.src, tgt)
        if not cache.layers:
            cache.layers = [LayerCache(self_k=k, self_v=v) for k, v in memory.kv]
            cache.key_mask, cache.positions = memory.mask, memory.lengths
        t = tgt.size(1)
        x = self._target(tgt, cache.positions)
        past = cache.key_mask.size(1)
        cache.key_mask = torch.cat(
            [cache.key_mask, cache.key_mask.new_ones(tgt.shape)], 1
        )
        attn = causal_mask(t, past + t, x.device) & cache.key_mask[:, None, None, :]
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = layer(x, attn, layer_cache)
        cache.positions = cache.positions + t
        cache.length += t
        return self._output(x)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced training: the target positions' logits (B, T, V)."""
        return self._full(src, tgt_in)

    def new_cache(self) -> PrefixCache:
        return PrefixCache()

    def target_positions(self, src: Tensor) -> Tensor:
        """(B, S) sources -> (B,) positions left after each source."""
        return self.cfg.max_positions - padding_mask(src, self.cfg.pad_id).sum(1)

    @torch.no_grad()
    def alignment(self, src: Tensor, tgt: Tensor, layer: int = -1) -> Tensor:
        """Teacher-force ``tgt`` (1, T) and return layer ``layer``'s attention of
        each target position to the source positions (H, T, S)."""
        n = len(self.layers)
        if not -n <= layer < n:
            raise ValueError(f"layer must be in [{-n}, {n - 1}]")
        attention = self.layers[layer].self_attn
        attention.record_weights = True
        try:
            self._full(src, tgt)
            weights = attention.weights  # (1, H, S + T, S + T)
        finally:
            attention.record_weights = False
            attention.weights = None
        s = src.size(1)
        return weights[0, :, s:, :s]
