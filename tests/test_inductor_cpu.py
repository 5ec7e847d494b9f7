"""Inductor's CPU kernels: boolean masks (``transformer.inductor_cpu``), whose
vectorised loads and stores are the ones generated and compute what eager does,
and dropout's random bits drawn by a custom operator (``transformer.dropout``).

Each case compiles C++ with inductor (seconds each, without its caches so that
the code is generated here): slow lane."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch._dynamo
from torch._inductor import config
from torch._inductor.utils import run_and_get_code

from tests.test_search import SRC
from transformer.config import DecodingConfig
from transformer.dropout import Dropout
from transformer.inductor_cpu import torch_is_patched, vectorize_bool_masks
from transformer.search import generate

pytestmark = pytest.mark.slow

STORE_MARK = "m_[j_].store("  # only in the line that vectorize_bool_masks writes
LOAD_MARK = "::loadu(b_))"


def vectorised() -> bool:
    """Does inductor vectorise here (and so write the changed lines)?"""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return torch_is_patched() and bool(pick_vec_isa())


@pytest.fixture
def generated():
    """Compile, run and return (outputs, generated C++ source) afresh."""

    def run(fn, *args, dynamic=False):
        torch._dynamo.reset()
        with config.patch(force_disable_caches=True):
            out, code = run_and_get_code(torch.compile(fn, dynamic=dynamic), *args)
        return out, "\n".join(code)

    applied = vectorize_bool_masks()
    assert applied == torch_is_patched()
    return run


def relu_and_mask(x):
    y = torch.relu(x)
    return y, y <= 0


def select_by_mask(x, m):
    return torch.where(m, x * 3, x - 1)


# sizes with a vector tail (not a multiple of 16 or 32 lanes) and without
@pytest.mark.parametrize("shape", [(1001,), (7, 37), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_stored_and_loaded_as_eager_does(generated, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    (y, mask), code = generated(relu_and_mask, x)
    want_y, want_mask = relu_and_mask(x)
    assert mask.dtype == torch.bool and torch.equal(mask, want_mask)
    assert torch.equal(y, want_y)

    m = torch.rand(shape, generator=g) < 0.4
    out, code_load = generated(select_by_mask, x, m)
    assert torch.equal(out, select_by_mask(x, m))
    if vectorised():
        assert STORE_MARK in code
        assert LOAD_MARK in code_load


def compare_all(x, y, b, u):
    """Masks from comparisons of int64, float64 and bool inputs, a mask read
    back and reduced, and a bool view of bytes (a ``Vectorized<bool>``, not a
    ``VecMask``, in inductor's code)."""
    both = (x > 3) & (y < 0.5) | b
    bytes_as_bool = u.view(torch.bool).clone()
    return (
        both,
        x == y.to(torch.int64),
        both.sum(-1),
        torch.where(both, y, -y),
        bytes_as_bool,
    )


@pytest.mark.parametrize("dynamic", [False, True])
def test_masks_of_other_dtypes_and_dynamic_shapes(generated, dynamic):
    g = torch.Generator().manual_seed(3)
    for rows, cols in [(3, 37), (5, 64)]:  # a second shape: dynamic reuses the code
        x = torch.randint(0, 7, (rows, cols), generator=g)
        y = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 7
        b = torch.rand(rows, cols, generator=g) < 0.2
        u = (torch.rand(rows, cols, generator=g) < 0.5).to(torch.uint8)
        got, code = generated(compare_all, x, y, b, u, dynamic=dynamic)
        for a, want in zip(got, compare_all(x, y, b, u), strict=True):
            assert a.dtype == want.dtype and torch.equal(a, want)
        if vectorised():
            assert "Vectorized<bool>" in code and STORE_MARK in code


def test_relu_gradient_through_the_saved_mask(generated):
    """ReLU's backward reads the bool mask the compiled forward stored."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 123, generator=g, requires_grad=True)
    w = torch.randn(5, 123, generator=g)

    def f(x):
        return (torch.relu(x * 2) * w).sum()

    loss, _ = generated(f, x)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    f(x2).backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.allclose(loss, f(x2.detach()))


def test_compiled_dropout_draws_bits_once_per_call_and_its_backward_reuses_them():
    """Under inductor, dropout's bits come from the ``random_bits_`` operator:
    two draws of one tensor are not merged into one, each drops at rate p, the
    backward pass applies the forward's masks (not a fresh draw), and a seed
    repeats the draw."""
    p = 0.5
    d = Dropout(p).train()

    def two_draws(x):
        return d(x), d(x) * 2

    torch._dynamo.reset()
    compiled = torch.compile(two_draws)
    with torch.random.fork_rng():  # the seeds below stay in this test
        g = torch.Generator().manual_seed(2)
        x = (torch.rand(64, 257, generator=g) + 0.5).requires_grad_()
        g1, g2 = torch.randn(64, 257, generator=g), torch.randn(64, 257, generator=g)
        torch.manual_seed(7)
        y1, y2 = compiled(x)
        (y1 * g1 + y2 * g2).sum().backward()
        kept1, kept2 = y1 != 0, y2 != 0
        assert not torch.equal(kept1, kept2)
        sd = (p * (1 - p) / x.numel()) ** 0.5
        for kept in (kept1, kept2):
            assert abs(1 - kept.float().mean().item() - p) < 5 * sd
        torch.testing.assert_close(y1[kept1], x[kept1] / (1 - p))
        want = (g1 * kept1 + g2 * 2 * kept2) / (1 - p)
        torch.testing.assert_close(x.grad, want)
        torch.manual_seed(7)
        again, _ = compiled(x)
        assert torch.equal(again, y1)


def test_decoding_compiled_by_inductor_finds_what_eager_finds(half_trained):
    """``decoding.compile`` with inductor itself (the bool-mask change applied):
    greedy and beam search return the hypotheses eager decoding returns."""
    torch._dynamo.reset()
    for strategy in ("greedy", "beam"):
        cfg = DecodingConfig(strategy=strategy, beam_size=3, nbest=2)
        want = generate(half_trained, SRC, cfg)
        got = generate(half_trained, SRC, replace(cfg, compile=True))
        assert [[h.tokens for h in hyps] for hyps in got] == [
            [h.tokens for h in hyps] for hyps in want
        ]
        for hyps, wants in zip(got, want, strict=True):
            for h, w in zip(hyps, wants, strict=True):
                assert h.score == pytest.approx(w.score, abs=1e-4)
