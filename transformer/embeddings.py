"""Token embeddings scaled by sqrt(d_model), and sinusoidal or learned positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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
        return nn.functional.embedding(tokens, self.weight, self.pad_id) * self.scale


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
