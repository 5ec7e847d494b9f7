"""The training objective: label-smoothed cross-entropy, computed in row chunks,
and ``forward_loss``, the teacher-forced forward pass and loss of a batch.

With smoothing eps over V classes, a target y and logits z, a row's loss is

    (1 - eps) * (lse(z) - z_y) + eps * (lse(z) - mean(z)),  lse = logsumexp,

and its gradient is softmax(z) - (1 - eps) * onehot(y) - eps / V. Both are
computed ``chunk_rows`` rows at a time (fewer for bf16 logits, ``CHUNK_BYTES``),
in float32, so no float32 copy, log-softmax or float32 gradient of the whole
(B * T, V) logits ever exists. The gradient is written in the logits' dtype
(bf16 under autocast) by the forward pass, from the same exponentials as the loss
(one pass of exp, not two); it is kept in place of the logits, which are not
needed again, and the backward pass only scales it. A training step
(``forward_loss_and_grad``) gives the scale to the forward pass instead and
starts the model's backward pass from the gradient itself.

Why over logits and not fused with the output projection: ``Transformer.forward``
returns logits, and DDP and ``torch.compile`` wrap that forward. A fused loss that
takes the decoder states and the tied embedding would never hold the logits at all,
but needs the model's training entry point to change for every caller.

The loss is a custom operator (``torch.library``): ``torch.compile`` sees one node
whatever the number of rows, so a new batch shape does not change the graph, and
the Python loop over chunks runs as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.config import PAD_ID
from transformer.precision import autocast

# the float32 exponentials of one chunk of lower-precision (bf16) logits: small
# enough to stay in a core's cache through the chunk's passes (exp, sum, gradient),
# so the logits are read from memory once and the gradient written once: 60 ms
# instead of 149 for a (4,089 x 8,000) bf16 batch in one 4,096-row chunk (Xeon
# with AMX). Float32 logits keep ``chunk_rows``: their exponentials go straight
# into the gradient, no chunk is copied.
CHUNK_BYTES = 4 * 2**20


@torch.library.custom_op("transformer::smoothed_ce", mutates_args=())
def _smoothed_ce(
    logits: Tensor,
    target: Tensor,
    epsilon: float,
    ignore: int,
    chunk_rows: int,
    with_grad: bool,
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(N, V) logits, (N,) targets -> the summed loss, in float32 (float64 for
    float64 logits), and, ``with_grad``, its gradient (N, V) in the logits' dtype
    (else an empty tensor), times ``grad_scale`` (a scalar tensor) where given."""
    n, v = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=logits.device)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    in_place = with_grad and logits.dtype == acc  # the chunk's exp goes into grad
    if logits.dtype != acc:  # a float32 chunk beside the logits: keep it in cache
        chunk_rows = min(chunk_rows, max(16, CHUNK_BYTES // (4 * v)))
    buffer = None if in_place else logits.new_empty((min(chunk_rows, n), v), dtype=acc)
    scale = None if grad_scale is None else grad_scale.to(acc)
    with torch.autocast(logits.device.type, enabled=False):
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = logits[rows]  # (C, V), in the logits' dtype: never copied whole
            y = target[rows]
            real = y != ignore
            out = grad[rows] if in_place else buffer[: z.size(0)]
            if logits.dtype == acc:
                top = z.amax(dim=-1, keepdim=True)  # (C, 1)
                shifted = torch.sub(z, top, out=out)
            else:  # the chunk's float32 copy first, then its max, both in cache:
                # a bf16 amax and a mixed-dtype sub (which converts into a
                # temporary) took 35 ms of a (4,089 x 8,000) loss, these 28
                shifted = out.copy_(z)
                top = shifted.amax(dim=-1, keepdim=True)
                shifted.sub_(top)
            # mean(z) from the float32 chunk: no second float32 copy of z
            mean = shifted.mean(dim=-1) + top.squeeze(1)
            e = shifted.exp_()
            mass = e.sum(dim=-1)  # (C,)
            lse = top.squeeze(1) + mass.log()
            picked = z.gather(1, torch.where(real, y, 0)[:, None]).squeeze(1)
            loss = lse - (1.0 - epsilon) * picked.to(acc) - epsilon * mean
            total += torch.where(real, loss, 0.0).sum()
            if with_grad:  # softmax - (1 - eps) onehot - eps / V on real rows
                keep = real.to(acc)[:, None]  # (C, 1)
                if scale is not None:  # folded into the pass: no pass of its own
                    keep = keep * scale
                e.mul_(keep / mass[:, None]).sub_(keep * (epsilon / v))
                e.scatter_add_(1, y[:, None].clamp(0, v - 1), keep * (epsilon - 1.0))
                if not in_place:  # one pass of conversion to the gradient's dtype
                    grad[rows].copy_(e)
    return total, grad


@_smoothed_ce.register_fake
def _smoothed_ce_fake(
    logits, target, epsilon, ignore, chunk_rows, with_grad, grad_scale=None
):
    acc = torch.promote_types(logits.dtype, torch.float32)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    return logits.new_empty((), dtype=acc), grad


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    # else autograd fills a (N, V) zero gradient for the second output, unused
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_total: Tensor, _):
    (grad,) = ctx.saved_tensors
    # in place: no second (B * T, V) tensor; a second backward through the same
    # graph fails autograd's version check instead of scaling twice. The scale
    # stays float32 on a bf16 gradient.
    return grad.mul_(grad_total), None, None, None, None, None, None


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
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    total, _ = _smoothed_ce(
        logits.flatten(0, 1), target.flatten(), epsilon, PAD_ID, chunk_rows, with_grad
    )
    return total


def forward_loss(
    model: torch.nn.Module,
    src: torch.Tensor,
    tgt_in: torch.Tensor,
    tgt_out: torch.Tensor,
    device: torch.device,
    precision: str,
    label_smoothing: float,
    chunk_rows: int,
) -> torch.Tensor:
    """Teacher-forced forward and summed label-smoothed loss of one batch, with
    autograd through the loss (scoring; a training step calls
    ``forward_loss_and_grad``).

    Args:
        src: (B, S) source ids; tgt_in, tgt_out: (B, T) decoder input and target.
    """
    with autocast(device, precision):
        logits = model(src, tgt_in)  # (B, T, V)
    return label_smoothed_loss(logits, tgt_out, label_smoothing, chunk_rows)


def forward_loss_and_grad(
    model: torch.nn.Module,
    src: torch.Tensor,
    tgt_in: torch.Tensor,
    tgt_out: torch.Tensor,
    device: torch.device,
    precision: str,
    label_smoothing: float,
    chunk_rows: int,
    grad_scale: torch.Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``forward_loss`` for a training step: the summed loss (no autograd), the
    logits, and the gradient of ``grad_scale`` x the loss with respect to them;
    ``torch.autograd.backward(logits, grad)`` then runs the model's backward
    pass. The unit that ``training.compile`` turns into one graph.

    Through ``forward_loss`` autograd hands the loss's backward the scale of the
    loss (``1 / tokens``) to multiply the gradient by: one more pass over the
    (B * T, V) gradient, 9 ms of a 415 ms bf16 update on the Xeon with AMX, and
    a kernel of its own under ``torch.compile``. Here the scale goes into the
    gradient in the pass that writes it.

    Args:
        grad_scale: a scalar tensor (a tensor, so that a compiled graph is not
            specialised on its value, which changes from step to step).
    """
    with autocast(device, precision):
        logits = model(src, tgt_in)  # (B, T, V)
    total, grad = _smoothed_ce(
        logits.detach().flatten(0, 1),
        tgt_out.flatten(),
        label_smoothing,
        PAD_ID,
        chunk_rows,
        True,
        grad_scale,
    )
    return total, logits, grad.view(logits.shape)
