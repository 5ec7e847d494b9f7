"""The chunked label-smoothed loss against a float64 reference of its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer.config import PAD_ID
from transformer.training.loss import label_smoothed_loss

EPS = 0.1


def batch(v=7, seed=0):
    """(2, 5, V) float64 logits and targets with padding (8 real rows of 10)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, v, generator=g, dtype=torch.float64) * 3
    target = torch.randint(1, v, (2, 5), generator=g)
    target[0, 4] = target[1, 3:] = PAD_ID
    return logits, target


def reference(logits, target, eps):
    """-sum over real rows of q . log_softmax(z), q = (1 - eps) onehot + eps / V."""
    v = logits.size(-1)
    logp = logits.double().log_softmax(-1)
    q = torch.full_like(logp, eps / v)
    q.scatter_add_(-1, target[..., None], torch.full_like(q[..., :1], 1 - eps))
    per_row = -(q * logp).sum(-1)
    return per_row[target != PAD_ID].sum()


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 10, 64])  # 10 rows; 64 > batch
@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 8e-3)],
)
def test_chunked_loss_and_gradient_match_float64_reference(chunk_rows, dtype, tol):
    logits64, target = batch()
    # the reference sees the same (rounded) values the loss sees
    rounded = logits64.to(dtype).double().requires_grad_()
    expected = reference(rounded, target, EPS)
    (expected_grad,) = torch.autograd.grad(expected, rounded)
    logits = logits64.to(dtype).requires_grad_()
    got = label_smoothed_loss(logits, target, EPS, chunk_rows)
    (grad,) = torch.autograd.grad(got * 2.5, logits)  # a scaled loss, as under DDP
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    # the loss is reduced in float32 at least, whatever the logits' dtype
    loss_tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), expected, rtol=loss_tol, atol=0)
    # the gradient is rounded to the logits' dtype
    torch.testing.assert_close(grad.double(), 2.5 * expected_grad, rtol=tol, atol=tol)
    assert (grad[target == PAD_ID] == 0).all()


def test_bf16_logits_are_reduced_in_cache_sized_chunks(monkeypatch):
    """bf16 logits go through a reused float32 chunk of ``CHUNK_BYTES`` (at least
    16 rows): 40 rows of 50 classes in three chunks, the last one short."""
    import transformer.training.loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 16 * 4 * 50)
    g = torch.Generator().manual_seed(4)
    logits64 = torch.randn(1, 40, 50, generator=g, dtype=torch.float64) * 3
    target = torch.randint(1, 50, (1, 40), generator=g)
    target[0, 37:] = PAD_ID
    rounded = logits64.bfloat16().double().requires_grad_()
    expected = reference(rounded, target, EPS)
    (expected_grad,) = torch.autograd.grad(expected, rounded)
    logits = logits64.bfloat16().requires_grad_()
    got = label_smoothed_loss(logits, target, EPS, chunk_rows=4096)
    (grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=8e-3, atol=8e-3)
    assert (grad[target == PAD_ID] == 0).all()


def test_chunked_loss_equals_torch_cross_entropy():
    logits, target = batch(v=11, seed=3)
    expected = F.cross_entropy(
        logits.flatten(0, 1),
        target.flatten(),
        ignore_index=PAD_ID,
        label_smoothing=EPS,
        reduction="sum",
    )
    got = label_smoothed_loss(logits, target, EPS, chunk_rows=3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    unsmoothed = label_smoothed_loss(logits, target, 0.0, chunk_rows=3)
    nll = F.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=PAD_ID, reduction="sum"
    )
    torch.testing.assert_close(unsmoothed, nll, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_rows", [2, 7, 100])
def test_gradients_through_a_tied_projection(chunk_rows):
    """Decoder states and the projection weight get the reference gradients."""
    g = torch.Generator().manual_seed(1)
    states = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    _, target = batch(v=9, seed=2)
    expected = reference(states @ weight.T, target, EPS)
    want = torch.autograd.grad(expected, (states, weight))
    got = label_smoothed_loss(states @ weight.T, target, EPS, chunk_rows)
    have = torch.autograd.grad(got, (states, weight))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_all_padding_gives_zero_loss_and_gradient():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    target = torch.full((1, 3), PAD_ID)
    loss = label_smoothed_loss(logits, target, EPS, chunk_rows=2)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_loss_memory_stays_below_one_float32_copy_of_the_logits():
    n, v, chunk = 4096, 8000, 128
    logits = torch.randn(n, v, device="cuda").bfloat16().requires_grad_()
    target = torch.randint(1, v, (1, n), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    label_smoothed_loss(logits[None], target, EPS, chunk).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # the bf16 gradient (n * v * 2 bytes) plus a few float32 chunks, well below the
    # n * v * 4 bytes of one float32 copy (the old loss held three of them)
    assert extra < n * v * 2 + 8 * chunk * v * 4 < n * v * 4


def test_a_second_backward_through_the_same_loss_is_refused():
    logits, target = batch()
    logits.requires_grad_()
    loss = label_smoothed_loss(logits, target, EPS)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_allocates_no_full_size_zero_gradient():
    # the loss op's second output (its saved gradient) is not differentiable: were
    # it, autograd would fill an (N, V) zero gradient for it on every backward
    logits, target = batch(v=50)
    logits = logits.float().requires_grad_()
    with torch.profiler.profile(record_shapes=True) as prof:
        label_smoothed_loss(logits, target, EPS).backward()
    full = [list(logits.flatten(0, 1).shape)]
    filled = [
        e.name
        for e in prof.events()
        if e.name in ("aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like")
        and e.input_shapes[:1] == full
    ]
    assert filled == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_step_gradient_is_autograds_through_a_scaled_loss(precision):
    """``forward_loss_and_grad`` (the trainer's step) writes the scale into the
    logits' gradient instead of multiplying it in a backward pass of its own:
    every parameter gets autograd's gradient of ``scale`` x the loss (float64:
    to rounding; bf16: no further from the float64 one than autograd's)."""
    import copy

    from tests.conftest import train_copy_model
    from transformer.training.loss import forward_loss, forward_loss_and_grad

    model64 = train_copy_model(0).double().train()
    for m in model64.modules():  # no dropout: the passes see the same network
        if hasattr(m, "p"):
            m.p = 0.0
    model = model64 if precision == "fp32" else copy.deepcopy(model64).float()
    src = torch.randint(4, 14, (3, 6), generator=torch.Generator().manual_seed(0))
    tgt = torch.cat([torch.ones(3, 1, dtype=torch.long), src], 1)
    tgt_in, tgt_out = tgt[:, :-1].clone(), tgt[:, 1:].clone()
    tgt_out[0, 4:] = PAD_ID
    scale = torch.tensor(1 / 17, dtype=torch.float32)
    cpu = torch.device("cpu")

    def autograd_grads(m, prec):
        m.zero_grad(set_to_none=True)
        loss = forward_loss(m, src, tgt_in, tgt_out, cpu, prec, EPS, 4)
        (loss * scale).backward()
        return loss.detach(), {n: p.grad.double() for n, p in m.named_parameters()}

    _, exact = autograd_grads(model64, "fp32")
    loss, expected = autograd_grads(model, precision)
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        total, logits, grad = forward_loss_and_grad(
            model, src, tgt_in, tgt_out, cpu, precision, EPS, 4, scale
        )
        torch.autograd.backward(logits, grad)
    assert not total.requires_grad and grad.shape == logits.shape
    torch.testing.assert_close(total, loss, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        if precision == "fp32":  # float64 weights: autograd's gradient
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-12, atol=1e-15)
        else:  # bf16 rounds both (2-6% from float64 here); this one rounds once
            size = exact[n].norm()
            ours = (p.grad.double() - exact[n]).norm() / size
            theirs = (expected[n] - exact[n]).norm() / size
            assert ours <= 1.1 * theirs + 5e-3, n
    full = (list(logits.shape), list(logits.flatten(0, 1).shape))
    multiplied = [
        e.name
        for e in prof.events()
        if e.name in ("aten::mul", "aten::mul_")
        and any(shape in e.input_shapes for shape in full)
    ]
    assert multiplied == []  # autograd's path: one mul_ of the (N, V) gradient
