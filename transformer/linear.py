"""Linear layers whose bf16 CPU training products see few distinct row counts.

A bf16 (or fp16) matrix product on a CPU runs in oneDNN, which builds a kernel
for each exact shape it meets and keeps the last few in a cache. A training batch
flattens to a row count (sentences x positions) that is new at almost every step,
so every product of the step pays for a kernel build, several times the cost of
the product itself (the benchmarks page has the figures); float32 products
(MKL) build nothing. Only training steps take this path (``linear``'s docstring
says why decoding does not).

``linear`` splits the rows of such a product into a body, the largest multiple of
``QUANTUM`` rows, and a tail computed as the last ``QUANTUM`` rows (overlapping
the body, written first so the body's values stand). A step then meets one body
shape for its source rows and one for its target rows, and one tail shape;
batches of a given token budget meet about ten body shapes in all, so kernels are
reused from step to step where oneDNN's cache holds them all
(``allocator.bound_kernel_caches``). Fewer than ``QUANTUM`` rows are padded with
zeros to a power of two. The backward pass does the same for the input's
gradient and splits the weight's gradient (a sum over rows) into the body and a
zero-masked tail. Each row's result comes from one product, as before; the
tail's rows that the body also computes (fewer than ``QUANTUM``) are the only
extra work.

The products are custom operators: ``torch.compile`` keeps them whole (one node
whatever the row count) and fuses what is around them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter

QUANTUM = 128  # rows: the body is a multiple of it, the tail this many rows
MIN_ROWS = 8  # fewer rows are padded up to this many
#: outputs at least this wide (a vocabulary) multiply by a contiguous copy of the
#: transposed weight, not by the transposed view: (3,968 x 256) @ (256 x 8,000)
#: 12.8 ms by the view against 6.5 with the copy on the Xeon with AMX, (x 512)
#: 19.8 against 16.3; 4,096 wide and narrower 0.8x (torch 2.13's oneDNN)
CONTIGUOUS_FROM = 6144
BUCKETED = True  # tests switch it off to compare with ``F.linear``

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_AUTOCAST_CASTS = {torch.float32, torch.bfloat16, torch.float16}  # not float64


def _padded_rows(m: int) -> int:
    """Rows a product of ``m`` < ``QUANTUM`` rows runs with: a power of two."""
    return max(MIN_ROWS, 1 << (m - 1).bit_length())


def bucketed_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) @ weight (N, K)^T (+ bias (N,)) -> (M, N), rows bucketed: what
    the ``transformer::bucketed_linear`` operator runs."""
    x = x.contiguous()
    m, n = x.size(0), weight.size(0)
    w_t = weight.t()  # (K, N), a view
    if n >= CONTIGUOUS_FROM:
        w_t = w_t.contiguous()
    if m < QUANTUM:
        rows = _padded_rows(m)
        if rows > m:
            x = torch.cat([x, x.new_zeros(rows - m, x.size(1))])  # (rows, K)
        out = torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)
        return out[:m].clone() if rows > m else out
    out = x.new_empty(m, n)
    body = m - m % QUANTUM
    if body < m:  # the tail first: the body then overwrites the rows they share
        tail = slice(m - QUANTUM, m)
        _mm_into(out[tail], x[tail], w_t, bias)
    _mm_into(out[:body], x[:body], w_t, bias)
    return out


def _mm_into(out: Tensor, x: Tensor, w_t: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        torch.mm(x, w_t, out=out)
    else:
        torch.addmm(bias, x, w_t, out=out)


def bucketed_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """grad (M, N)^T @ x (M, K) -> (N, K): the sum over rows, rows bucketed: what
    the ``transformer::bucketed_weight_grad`` operator runs."""
    grad, x = grad.contiguous(), x.contiguous()
    m = grad.size(0)
    if m < QUANTUM:
        pad = _padded_rows(m) - m
        grad = torch.cat([grad, grad.new_zeros(pad, grad.size(1))])
        x = torch.cat([x, x.new_zeros(pad, x.size(1))])
        return torch.mm(grad.t(), x)
    body = m - m % QUANTUM
    out = torch.mm(grad[:body].t(), x[:body])
    if body < m:  # the last QUANTUM rows, those of the body zeroed
        tail = grad[m - QUANTUM :].clone()
        tail[: body - (m - QUANTUM)] = 0
        out.addmm_(tail.t(), x[m - QUANTUM :])
    return out


@torch.library.custom_op("transformer::bucketed_linear", mutates_args=())
def _bucketed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return bucketed_product(x, weight, bias)


@_bucketed_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.size(0), weight.size(0))


@torch.library.custom_op("transformer::bucketed_weight_grad", mutates_args=())
def _bucketed_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    return bucketed_weight_grad(grad, x)


@_bucketed_weight_grad.register_fake
def _(grad, x):
    return grad.new_empty(grad.size(1), x.size(1))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:  # grad (M, N) @ weight (N, K)
        grad_x = _bucketed_linear(grad, weight.t(), None)
    if ctx.needs_input_grad[1]:
        grad_w = _bucketed_weight_grad(grad, x)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum(0)
    return grad_x, grad_w, grad_b


_bucketed_linear.register_autograd(_backward, setup_context=_setup_context)

#: the operators and the Python functions they run (a dispatch mode that records
#: the products of a step runs these to see inside them: ``scripts/bench_common.py``)
IMPLEMENTATIONS = {
    torch.ops.transformer.bucketed_linear.default: bucketed_product,
    torch.ops.transformer.bucketed_weight_grad.default: bucketed_weight_grad,
}


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # the rows asked for, not run


def _weight_grad_flops(grad_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * grad_shape[1] * x_shape[1]


# FLOP counts for ``FlopCounterMode`` (model FLOPs in the benchmarks), which does
# not look inside a custom operator
for _op, _formula in (
    (torch.ops.transformer.bucketed_linear, _linear_flops),
    (torch.ops.transformer.bucketed_weight_grad, _weight_grad_flops),
):
    if _op not in flop_counter.flop_registry:  # a module reload registers again
        flop_counter.register_flop_formula(_op)(_formula)


def _bucketed_dtype(
    x: Tensor, weight: Tensor, bias: Tensor | None
) -> torch.dtype | None:
    """The bf16 or fp16 dtype ``F.linear(x, weight, bias)`` would multiply in
    on a CPU with autograd on (autocast's, for operands autocast casts); None
    for anything else: float32 or float64 products, other devices, no autograd,
    or dtypes that ``F.linear`` itself refuses."""
    if not (
        BUCKETED
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dim() > 0
        and x.numel() > 0
    ):
        return None
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if torch.is_autocast_enabled("cpu"):
        if not dtypes <= _AUTOCAST_CASTS:  # float64 stays float64 under autocast
            return None
        dtype = torch.get_autocast_dtype("cpu")
    elif len(dtypes) == 1:
        dtype = x.dtype
    else:
        return None
    return dtype if dtype in _LOW_PRECISION else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, with bucketed rows where the product runs
    in bf16 or fp16 on a CPU (under autocast too, with autocast's casts) with
    autograd on: a training step. Without autograd (decoding) it is ``F.linear``:
    there autocast's cache casts a float32 weight once for all the steps of a
    search, where this function would cast it at every step.

    The weight's gradient is rounded to the product's dtype twice (the body's
    sum, then with the tail's), about 1.4x ``F.linear``'s rounding error; it has
    no gradient of its own (no double backward).

    Shape:
        x: (..., K); weight: (N, K); bias: (N,) -> (..., N).
    """
    dtype = _bucketed_dtype(x, weight, bias)
    if dtype is None:
        return F.linear(x, weight, bias)
    return _bucketed(x, weight, bias, dtype)


def _bucketed(
    x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """``linear``'s bucketed path, in ``dtype`` (``_bucketed_dtype``'s answer)."""
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        out = _bucketed_linear(x.reshape(-1, x.size(-1)), weight, bias)  # (M, N)
    return out.view(*x.shape[:-1], weight.size(0))


def apply(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``, through ``linear`` where that buckets the rows and
    ``layer`` is a plain ``nn.Linear`` without hooks of its own (packed and
    quantized layers have their own products; hooks need the module's call)."""
    if type(layer) is nn.Linear and not (
        layer._forward_hooks or layer._forward_pre_hooks
    ):
        dtype = _bucketed_dtype(x, layer.weight, layer.bias)
        if dtype is not None:
            return _bucketed(x, layer.weight, layer.bias, dtype)
    return layer(x)
