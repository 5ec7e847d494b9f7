"""Multi-head attention over ``F.scaled_dot_product_attention``, and mask helpers.

Mask convention everywhere: boolean, True = may attend (the one SDPA uses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer import linear
from transformer.dropout import dropout, uses_bits


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, S) ids -> (B, S) bool, True at real tokens."""
    return tokens != pad_id


def causal_mask(
    n_queries: int, n_keys: int, device: torch.device | None = None
) -> Tensor:
    """(Tq, Tk) bool mask for the last ``n_queries`` positions of ``n_keys``.

    Query i sits at absolute position n_keys - n_queries + i and may attend keys at or
    before it (bottom-right aligned, which is what cached decoding needs; SDPA's
    ``is_causal`` aligns top-left and is only right when Tq == Tk).
    """
    offset = n_keys - n_queries
    q = torch.arange(n_queries, device=device)[:, None]
    k = torch.arange(n_keys, device=device)[None, :]
    return k <= q + offset


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Plain-math attention softmax(q k^T / sqrt(d)) v, returning the weights too.

    Args:
        q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh).
        mask: bool, broadcastable to (B, H, Tq, Tk), True = may attend.
        is_causal: apply SDPA's top-left causal mask (Tq == Tk).

    Returns:
        output (B, H, Tq, Dh) and weights (B, H, Tq, Tk).
    """
    weights = attention_weights(q, k, mask, is_causal)
    return weights @ v, weights


def attention_weights(
    q: Tensor, k: Tensor, mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """softmax(q k^T / sqrt(d)) with ``reference_attention``'s masks: (B, H, Tq, Tk)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if is_causal:
        tq, tk = scores.shape[-2:]
        scores = scores.masked_fill(
            ~torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(), -math.inf
        )
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.softmax(dim=-1)


#: bf16 training on a CPU attends by the plain math (``attention_weights``, then
#: the product with the values, autograd through both) up to this many keys:
#: there SDPA's bf16 CPU kernel trains several times slower (its backward; the
#: benchmarks page has the measurements), beyond it the two are about even
MATH_KEYS = 256


def trains_faster_by_math(q: Tensor, k: Tensor) -> bool:
    """Would attention over ``q``, ``k`` (bf16 CPU tensors under autograd)
    train faster as the plain math than in SDPA? Compiled too, so that a
    compiled step computes what an eager one does."""
    return (
        q.requires_grad
        and torch.is_grad_enabled()
        and q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        # last: a compiled step's only size guards (a batch whose sources or
        # targets cross MATH_KEYS compiles once more)
        and k.size(-2) <= MATH_KEYS
    )


#: at most this many queries per row and head (a decoding step's one, or the
#: beams of a sentence in cross-attention) make a few-query call
FEW_QUERIES = 16


def few_query_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(d)) v as two float32 products, for bf16 tensors on a
    CPU with a few queries: there SDPA's bf16 kernel spends most of its time
    setting up the blocks of its matrix units rather than computing, while
    these products take the inputs as exact float32 values (the output is
    rounded back to ``q``'s dtype). A query that may attend no key gets zeros,
    as from SDPA. Shapes as ``reference_attention``'s."""
    with torch.autocast(q.device.type, enabled=False):
        weights = attention_weights(q.float(), k.float(), mask)
        if mask is not None:
            weights = weights.nan_to_num(0.0)
        return (weights @ v.float()).to(q.dtype)


class MultiHeadAttention(nn.Module):
    """Shared parts of self- and cross-attention: head split/merge and the kernel.

    Set ``record_weights = True`` to run the reference path and keep the attention
    weights of the last call in ``self.weights`` (B, H, Tq, Tk), for plots.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(d_model, d_model)
        self.record_weights = False
        self.weights: Tensor | None = None

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """q: (B, H, Tq, Dh), k/v: (B, H, Tk, Dh) -> (B, Tq, D).

        k/v (and mask) may hold B / g rows, each shared by g consecutive query rows
        (the beams of one sentence): the g queries then attend together, and the
        keys/values are read once instead of g times.
        """
        b, h, t, d = q.shape
        group = b // k.size(0)
        if group > 1:  # (B, H, T, Dh) -> (B / g, H, g * T, Dh)
            q = q.view(-1, group, h, t, d).transpose(1, 2).reshape(-1, h, group * t, d)
        if self.record_weights:
            out, weights = reference_attention(q, k, v, mask, is_causal)
            if group > 1:
                weights = weights.view(-1, h, group, t, weights.size(-1))
                weights = weights.transpose(1, 2).reshape(b, h, t, -1)
            self.weights = weights
        elif (
            # inference only (autograd goes on below); the size test last, so
            # that a compiled training step holds no guard on it
            not torch.is_grad_enabled()
            and q.dtype == torch.bfloat16
            and q.device.type == "cpu"
            and not is_causal
            and q.size(2) <= FEW_QUERIES
        ):
            out = few_query_attention(q, k, v, mask)
        elif (self.training and self.dropout > 0 and uses_bits(q)) or (
            trains_faster_by_math(q, k)
        ):
            # SDPA's CPU kernel with dropout is its math path anyway, drawing
            # the mask with torch's slow generator: the same math, our mask;
            # and bf16 under autograd, where SDPA's backward is the slow one.
            # A query with no key to attend gets NaN here (SDPA: zeros); no
            # batch has one, as every source ends in <eos>.
            weights = attention_weights(q, k, mask, is_causal)
            out = dropout(weights, self.dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
            )
        if group > 1:
            out = out.view(-1, h, group, t, d).transpose(1, 2).reshape(b, h, t, d)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.d_head)  # (B, T, D)
        return linear.apply(self.out_proj, out)


class SelfAttention(MultiHeadAttention):
    """Self-attention with one fused Q/K/V projection."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__(d_model, n_heads, dropout)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) -> q, k, v each (B, H, T, Dh)."""
        q, k, v = linear.apply(self.qkv_proj, x).chunk(3, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)


class CrossAttention(MultiHeadAttention):
    """Encoder-decoder attention; keys/values are projected once per source."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__(d_model, n_heads, dropout)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, D) -> k, v each (B, H, S, Dh)."""
        k, v = linear.apply(self.kv_proj, memory).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)
