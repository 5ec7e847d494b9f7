"""Dropout on a CPU from random bits: the feed-forward and residual ``Dropout``
and the functional ``dropout`` that attention applies to its weights.

torch draws a CPU dropout mask (``bernoulli_``) at about 100M elements/s whatever
the vendor (measured on an AMD EPYC and on an Intel Xeon with AMX, torch 2.13): a
quarter of a bf16 training step on the Xeon. Here the mask comes from 16 random
bits per element drawn as 64-bit words (one draw for four elements), about 4x
faster. An element is kept when its bits reach ``round(p * 2^16)``, so the drop
rate is p to within 2^-17; kept values are scaled by 1 / (1 - p) as in
``nn.Dropout``. On other devices it is torch's own dropout.

Under ``torch.compile`` the bits come from a custom operator (``random_bits_``),
opaque to inductor, which fuses the comparison and the scaling into the kernels
around it; inductor's own generator draws each element on its own (a Philox
counter per element, not vectorised in torch 2.13's CPU code), several times
slower (the benchmarks page). The operator fills a fresh buffer in place and is
tagged ``nondeterministic_seeded``: the compiler neither merges two draws into
one nor draws again for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BITS = True  # the random-bits mask on CPU (tests switch it off to compare)


def uses_bits(x: Tensor) -> bool:
    """Would ``dropout`` draw ``x``'s mask from random bits?"""
    return BITS and x.device.type == "cpu"


@torch.library.custom_op(
    "transformer::random_bits_",
    mutates_args=("words",),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def random_bits_(words: Tensor) -> None:
    """Fill the int64 tensor ``words`` with uniform random bits (every bit),
    from the default generator."""
    words.random_(-(2**63), None)


def random_bits(x: Tensor) -> Tensor:
    """16 uniform random bits per element of ``x`` (its shape; int16, signed:
    -2^15 .. 2^15 - 1), drawn as 64-bit words. A fresh buffer filled in place,
    so that a compiler never takes two draws for one (it merges calls of a pure
    operator with the same arguments, and never two fresh buffers)."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    random_bits_(words)
    return words.view(torch.int16)[:n].view(x.shape)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``, with the random-bits mask on CPU."""
    if not training or p == 0.0 or p == 1.0 or not uses_bits(x):
        return F.dropout(x, p, training)
    keep = random_bits(x) >= round(p * 2**16) - 2**15
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` with ``dropout``'s mask."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
