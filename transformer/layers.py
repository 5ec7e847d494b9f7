"""Position-wise feed-forward, encoder and decoder layers (post-norm or
pre-norm)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from transformer import linear
from transformer.attention import CrossAttention, SelfAttention, causal_mask
from transformer.cache import LayerCache
from transformer.config import ModelConfig
from transformer.dropout import Dropout

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class FeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2, applied at every position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.activation = _ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        return linear.apply(self.fc2, self.activation(linear.apply(self.fc1, x)))


class Residual(nn.Module):
    """Residual connection around a sublayer with dropout and LayerNorm.

    Post-norm (paper): LayerNorm(x + Dropout(f(x))). Pre-norm: x + Dropout(f(LN(x))).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def pre(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.norm_first else x

    def post(self, x: Tensor, y: Tensor) -> Tensor:
        out = x + self.dropout(y)
        return out if self.norm_first else self.norm(out)


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward: the encoder's layer, and with a causal mask
    and a cache the decoder-only model's (``models/decoder_only.py``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg)
        self.attn_res = Residual(cfg)
        self.ffn_res = Residual(cfg)

    def forward(
        self, x: Tensor, mask: Tensor, cache: LayerCache | None = None
    ) -> Tensor:
        """Run T new positions.

        Args:
            x: (B, T, D) the new positions.
            mask: bool, True = may attend: (B, 1, 1, T) at real source tokens in
                the encoder; (B, 1, T, P + T) over the P past keys in ``cache``
                and the new ones in the decoder-only model.
            cache: the past positions' K/V, extended in place with the new ones.
        """
        h = self.attn_res.pre(x)
        q, k, v = self.self_attn.project(h)  # (B, H, T, Dh)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, H, P + T, Dh)
        x = self.attn_res.post(x, self.self_attn.attend(q, k, v, mask, is_causal=False))
        return self.ffn_res.post(x, self.ffn(self.ffn_res.pre(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = CrossAttention(
            cfg.d_model, cfg.n_heads, cfg.attention_dropout
        )
        self.ffn = FeedForward(cfg)
        self.self_res = Residual(cfg)
        self.cross_res = Residual(cfg)
        self.ffn_res = Residual(cfg)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Run T new target positions.

        Args:
            x: (B, T, D) the new target positions.
            memory: (B, S, D) encoder output (unused once ``cache`` holds cross K/V).
            memory_mask: (B, 1, 1, S) bool, True at real source tokens.
            cache: this layer's state; extended in place with the new K/V.
        """
        h = self.self_res.pre(x)
        q, k, v = self.self_attn.project(h)  # (B, H, T, Dh)
        if cache is None or cache.self_k is None:
            # No past: SDPA's top-left causal mask is right (and allows flash kernels).
            mask, is_causal = None, True
        else:
            # One new query sees every key; several need a bottom-right causal mask.
            t = q.size(2)
            past = cache.self_k.size(2)
            mask = None if t == 1 else causal_mask(t, past + t, x.device)
            is_causal = False
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, H, P + T, Dh)
        if q.size(2) == 1:
            is_causal = False  # a single query with no past attends to itself only
        x = self.self_res.post(x, self.self_attn.attend(q, k, v, mask, is_causal))

        h = self.cross_res.pre(x)
        q = linear.apply(self.cross_attn.q_proj, h)
        q = self.cross_attn.split_heads(q)  # (B, H, T, Dh)
        if cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            k, v = self.cross_attn.project_memory(memory)  # (B, H, S, Dh)
            if cache is not None:  # contiguous, as after any reorder: one layout
                cache.cross_k, cache.cross_v = k.contiguous(), v.contiguous()
        x = self.cross_res.post(
            x, self.cross_attn.attend(q, k, v, memory_mask, is_causal=False)
        )
        return self.ffn_res.post(x, self.ffn(self.ffn_res.pre(x)))
