"""The training objective: label-smoothed cross-entropy, computed in row chunks.

With smoothing eps over V classes, a target y and logits z, a row's loss is

    (1 - eps) * (lse(z) - z_y) + eps * (lse(z) - mean(z)),  lse = logsumexp,

and its gradient is softmax(z) - (1 - eps) * onehot(y) - eps / V. Both are
computed ``chunk_rows`` rows at a time: each chunk is cast to float32 and reduced,
so no float32 copy, log-softmax or float32 gradient of the whole (B * T, V) logits
ever exists. The logits stay in the dtype the model made them in (bf16 under
autocast); only their logsumexp (B * T floats) is kept for the backward pass, which
writes the gradient in that dtype.

Why over logits and not fused with the output projection: ``Transformer.forward``
returns logits, and DDP and ``torch.compile`` wrap that forward. A fused loss that
takes the decoder states and the tied embedding would never hold the logits at all,
but needs the model's training entry point to change for every caller.

The two passes are custom operators (``torch.library``): ``torch.compile`` sees one
node each, whatever the number of rows, so a new batch shape does not change the
graph, and the Python loop over chunks runs as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.config import PAD_ID


@torch.library.custom_op("transformer::smoothed_ce", mutates_args=())
def _smoothed_ce(
    logits: Tensor, target: Tensor, epsilon: float, ignore: int, chunk_rows: int
) -> tuple[Tensor, Tensor]:
    """(N, V) logits, (N,) targets -> the summed loss and the lse (N,), both in
    float32 (float64 for float64 logits)."""
    n, v = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    with torch.autocast(logits.device.type, enabled=False):
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = logits[rows].to(acc)  # (C, V), the only float32 copy
            y = target[rows]
            real = y != ignore
            lse[rows] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, torch.where(real, y, 0)[:, None]).squeeze(1)
            loss = lse[rows] - (1.0 - epsilon) * picked - epsilon * z.mean(dim=-1)
            total += torch.where(real, loss, 0.0).sum()
    return total, lse


@_smoothed_ce.register_fake
def _smoothed_ce_fake(logits, target, epsilon, ignore, chunk_rows):
    acc = torch.promote_types(logits.dtype, torch.float32)
    return logits.new_empty((), dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


@torch.library.custom_op("transformer::smoothed_ce_backward", mutates_args=())
def _smoothed_ce_backward(
    grad: Tensor,
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    epsilon: float,
    ignore: int,
    chunk_rows: int,
) -> Tensor:
    """The gradient of the summed loss w.r.t. the logits, (N, V) in their dtype."""
    n, v = logits.shape
    out = torch.empty_like(logits)
    with torch.autocast(logits.device.type, enabled=False):
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            y = target[rows]
            real = y != ignore
            p = torch.exp(logits[rows].to(lse.dtype) - lse[rows, None])  # softmax
            p -= epsilon / v
            hit = torch.full_like(p[:, :1], epsilon - 1.0)
            p.scatter_add_(1, torch.where(real, y, 0)[:, None], hit)
            p *= torch.where(real, grad.to(lse.dtype), 0.0)[:, None]
            out[rows] = p
    return out


@_smoothed_ce_backward.register_fake
def _smoothed_ce_backward_fake(grad, logits, target, lse, epsilon, ignore, chunk_rows):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, target, epsilon, ignore, chunk_rows = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.settings = (epsilon, ignore, chunk_rows)


def _backward(ctx, grad_total: Tensor, grad_lse: Tensor):
    logits, target, lse = ctx.saved_tensors
    grad = _smoothed_ce_backward(grad_total, logits, target, lse, *ctx.settings)
    return grad, None, None, None, None


_smoothed_ce.register_autograd(_backward, setup_context=_setup_context)


def label_smoothed_loss(
    logits: Tensor, target: Tensor, epsilon: float, chunk_rows: int = 4096
) -> Tensor:
    """Summed cross-entropy against (1 - eps) one-hot + eps / V uniform, pads ignored.

    Equals ``F.cross_entropy(logits.float(), target, ignore_index=PAD_ID,
    label_smoothing=eps, reduction="sum")`` without its full-size float32 tensors.

    Args:
        logits: (B, T, V) in any float dtype; target: (B, T) with ``PAD_ID`` where
            there is no token.
        chunk_rows: rows (target positions) reduced at a time
            (``training.loss_chunk_rows``).

    Returns:
        A float32 scalar (float64 for float64 logits).
    """
    total, _ = _smoothed_ce(
        logits.flatten(0, 1), target.flatten(), epsilon, PAD_ID, chunk_rows
    )
    return total
