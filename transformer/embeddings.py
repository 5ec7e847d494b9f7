"""Token embeddings scaled by sqrt(d_model), and sinusoidal or learned positions.

Under ``torch.compile`` on a CPU, a training step's token lookups go through two
custom operators (``lookup``): inductor (torch 2.13) decomposes the lookup's
backward into a scatter of atomic adds, 2.5x ATen's own on a (4,080 x 256)
gradient of an 8,000-row table (4.4 against 1.7 ms for the lookup, its scaling
and backward; the benchmarks page). The operators keep ATen's kernels; eager and
decoding call ``F.embedding`` as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPERATORS = True  # ``lookup``'s custom operators under compile (off: to compare)


@torch.library.custom_op("transformer::embedding", mutates_args=())
def _embedding(weight: Tensor, tokens: Tensor, pad_id: int) -> Tensor:
    return F.embedding(tokens, weight, pad_id)


@_embedding.register_fake
def _(weight, tokens, pad_id):
    return weight.new_empty(*tokens.shape, weight.size(1))


@torch.library.custom_op("transformer::embedding_backward", mutates_args=())
def _embedding_backward(grad: Tensor, tokens: Tensor, rows: int, pad_id: int) -> Tensor:
    return torch.ops.aten.embedding_dense_backward(grad, tokens, rows, pad_id, False)


@_embedding_backward.register_fake
def _(grad, tokens, rows, pad_id):
    return grad.new_empty(rows, grad.size(-1))


def _setup_context(ctx, inputs, output) -> None:
    weight, tokens, pad_id = inputs
    ctx.save_for_backward(tokens)
    ctx.rows, ctx.pad_id = weight.size(0), pad_id


def _backward(ctx, grad: Tensor):
    (tokens,) = ctx.saved_tensors
    return _embedding_backward(grad, tokens, ctx.rows, ctx.pad_id), None, None


_embedding.register_autograd(_backward, setup_context=_setup_context)


def lookup(tokens: Tensor, weight: Tensor, pad_id: int) -> Tensor:
    """``F.embedding(tokens, weight, pad_id)``; while ``torch.compile`` traces a
    CPU lookup whose table takes a gradient, the custom operators (the module
    docstring says why)."""
    if (
        OPERATORS
        and torch.compiler.is_compiling()
        and weight.device.type == "cpu"
        and weight.requires_grad
        and torch.is_grad_enabled()
    ):
        return _embedding(weight, tokens, pad_id)
    return F.embedding(tokens, weight, pad_id)


class TokenEmbedding(nn.Module):
    """Embedding lookup multiplied by sqrt(d_model), as in the paper (section 3.4).

    Initialised with std d_model^-0.5 so that the scaled embedding has unit variance,
    which also suits tying with the output projection.
    """

    def __init__(self, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.pad_id = pad_id
        self.scale = math.sqrt(d_model)
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, D)."""
        return lookup(tokens, self.weight, self.pad_id) * self.scale


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Computed in float64 and returned as float32, shape (n_positions, d_model).
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(D/2),)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (P, ceil(D/2))
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.float()


class PositionalEncoding(nn.Module):
    """Adds positions ``offset .. offset+T-1`` to a (B, T, D) sequence."""

    def __init__(self, max_positions: int, d_model: int, learned: bool) -> None:
        super().__init__()
        self.max_positions = max_positions
        if learned:
            self.learned = nn.Embedding(max_positions, d_model)
            nn.init.normal_(self.learned.weight, mean=0.0, std=d_model**-0.5)
        else:
            self.learned = None
            # not a parameter and not saved: it is a pure function of the config
            self.register_buffer(
                "table", sinusoidal_table(max_positions, d_model), persistent=False
            )

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x: (B, T, D); positions start at ``offset`` (the cached prefix length)."""
        end = offset + x.size(1)
        if end > self.max_positions:
            raise ValueError(
                f"sequence needs position {end - 1} but the model has only "
                f"max_positions={self.max_positions}"
            )
        if self.learned is not None:
            pos = torch.arange(offset, end, device=x.device)
            return x + self.learned(pos)
        return x + self.table[offset:end].to(x.dtype)

    def at(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, T, D) plus the encodings of ``positions`` (B, T), one per row
        (callers keep them below ``max_positions``)."""
        if self.learned is not None:
            return x + self.learned(positions)
        return x + self.table[positions].to(x.dtype)
