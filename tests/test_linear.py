"""Linear layers with bucketed row counts (``transformer.linear``): the same
products and gradients as ``F.linear``, each row counted once, and few distinct
product shapes whatever the batch's row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from transformer import linear
from transformer.linear import QUANTUM

K, N = 24, 40  # no power of two, no multiple of QUANTUM: told apart from row counts


def operands(m, seed=0, k=K, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    up = torch.randn(m, n, generator=g)  # the gradient arriving from above
    return x, w, b, up


def run(fn, x, w, b, up, dtype, autocast):
    """fn's output and the gradients of x, w, b, all as float64."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    if not autocast:
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out = fn(*leaves)
    out.backward(up.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def reference(x, w, b, up, dtype):
    """Float64 products of the operands rounded to ``dtype``."""
    x, w, b = (t.to(dtype).double() for t in (x, w, b))
    up = up.to(dtype).double()
    return [x @ w.T + b, up @ w, up.T @ x, up.sum(0)]


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("m", [1, 5, 8, 9, 127, 128, 129, 200, 255, 256, 383, 1000])
@pytest.mark.parametrize(
    "dtype, autocast",
    [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)],
)
def test_output_and_gradients_as_accurate_as_f_linear(m, dtype, autocast):
    x, w, b, up = operands(m)
    ref = reference(x, w, b, up, dtype)
    ours = run(linear.linear, x, w, b, up, dtype, autocast)
    theirs = run(F.linear, x, w, b, up, dtype, autocast)
    names = ("out", "grad x", "grad w", "grad b")
    for name, o, t, r in zip(names, ours, theirs, ref, strict=True):
        assert o.shape == r.shape, name
        # a row counted twice (or lost) in the weight's gradient is an error of
        # ~sqrt(rows / m), far above the rounding of either
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 2e-3, name


@pytest.mark.parametrize("m", [100, 300])
def test_a_vocabulary_wide_output_as_accurate_as_f_linear(m):
    """Outputs of ``CONTIGUOUS_FROM`` columns or more multiply by a contiguous
    copy of the transposed weight: the same accuracy, and the same gradients."""
    n = linear.CONTIGUOUS_FROM + 7
    x, w, b, up = operands(m, n=n)
    ref = reference(x, w, b, up, torch.bfloat16)
    ours = run(linear.linear, x, w, b, up, torch.bfloat16, True)
    theirs = run(F.linear, x, w, b, up, torch.bfloat16, True)
    names = ("out", "grad x", "grad w", "grad b")
    for name, o, t, r in zip(names, ours, theirs, ref, strict=True):
        assert o.shape == r.shape, name
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 2e-3, name


def test_three_dimensional_input_and_no_bias():
    x = torch.randn(3, 70, K, dtype=torch.bfloat16, requires_grad=True)  # 210 rows
    w = torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True)
    out = linear.linear(x, w)
    assert out.shape == (3, 70, N)
    expected = F.linear(x.double(), w.double())
    assert rel_err(out.detach().double(), expected.detach()) < 1e-2
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_odd_operands_match_f_linear():
    """A transposed weight view, a non-contiguous input, a 1-D input, and only
    some operands wanting a gradient: as ``F.linear``."""
    g = torch.Generator().manual_seed(3)
    base_x = torch.randn(K, 300, generator=g).bfloat16()
    base_w = torch.randn(K, N, generator=g).bfloat16()
    cases = [
        (base_x.t(), base_w.t(), (True, True)),  # both transposed views
        (base_x.t(), base_w.t().contiguous(), (False, True)),  # weight only
        (base_x.t(), base_w.t().contiguous(), (True, False)),  # input only
        (base_x[:, 0], base_w.t().contiguous(), (True, True)),  # 1-D input
    ]
    for x, w, wants in cases:
        results = []
        for fn in (linear.linear, F.linear):
            xs = x.detach().clone().requires_grad_(wants[0])
            ws = w.detach().clone().requires_grad_(wants[1])
            out = fn(xs, ws)
            out.float().square().sum().backward()
            results.append([out] + [t.grad for t in (xs, ws) if t.requires_grad])
        for ours, theirs in zip(*results, strict=True):
            assert ours.shape == theirs.shape
            assert rel_err(ours.double(), theirs.double()) < 1e-2


def test_dtypes_as_f_linear_decides_them():
    x, w, b, _ = operands(300)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64: autocast leaves it
        out = linear.linear(x64, w64)
    assert out.dtype == torch.float64 and torch.equal(out, F.linear(x64, w64))
    xb = x.bfloat16().requires_grad_()
    with pytest.raises(RuntimeError):  # mixed dtypes without autocast
        F.linear(xb, w)
    with pytest.raises(RuntimeError):
        linear.linear(xb, w)


def test_apply_keeps_the_layers_hooks():
    layer = torch.nn.Linear(K, N).bfloat16()
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(300, K, dtype=torch.bfloat16, requires_grad=True)
    assert torch.equal(linear.apply(layer, x), layer(x))
    assert seen == [(300, N), (300, N)]
    hookless = torch.nn.Linear(K, N).bfloat16()
    assert 300 not in product_row_counts(lambda: linear.apply(hookless, x))


def product_row_counts(fn):
    """Every dimension of the 2-D operands of the matrix products ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    dims = set()
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            shapes = [s for s in event.input_shapes if len(s) == 2]
            for shape in shapes[-3:]:
                dims.update(shape)
    return dims


def allowed(d):
    return d in (K, N) or d % QUANTUM == 0 or d in (8, 16, 32, 64)


def test_products_run_on_few_row_counts():
    """Every row count of 900..1100 runs its forward and backward products on
    bodies of 896 or 1024 rows and a tail of QUANTUM rows: no other size."""
    seen = set()
    for m in range(900, 1101, 7):
        x, w, b, up = operands(m)
        leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x, w, b)]

        def step(leaves=leaves, up=up):
            linear.linear(*leaves).backward(up.to(torch.bfloat16))

        dims = product_row_counts(step)
        assert all(allowed(d) for d in dims), sorted(dims)
        seen |= dims - {K, N}
    assert seen == {896, 1024, QUANTUM}


def test_small_row_counts_run_on_powers_of_two():
    for m, rows in ((1, 8), (3, 8), (8, 8), (9, 16), (100, 128), (127, 128)):
        x = torch.randn(m, K, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True)
        dims = product_row_counts(lambda x=x, w=w: linear.linear(x, w).sum().backward())
        assert dims - {K, N} == {rows}, m


def test_float32_and_inference_take_f_linear_unchanged():
    x, w, b, _ = operands(300)
    assert torch.equal(linear.linear(x, w, b), F.linear(x, w, b))  # float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear.linear(x, w, b), F.linear(x, w, b))
    with torch.no_grad():
        dims = product_row_counts(lambda: linear.linear(x.bfloat16(), w.bfloat16()))
    assert 300 in dims  # not bucketed without autograd


def test_flop_counter_counts_the_rows_asked_for():
    """FlopCounterMode (the benchmarks' model FLOPs) counts the operators as
    ``F.linear``'s products: 2 M K N forward and twice that backward."""
    from torch.utils.flop_counter import FlopCounterMode

    for fn in (linear.linear, F.linear):
        x = torch.randn(300, K, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True)
        with FlopCounterMode(display=False) as count:
            fn(x, w).sum().backward()
        assert count.get_total_flops() == 3 * 2 * 300 * K * N, fn


def test_custom_operators_pass_opcheck():
    x, w, b, _ = operands(200)
    x, w, b = (t.bfloat16().requires_grad_() for t in (x, w, b))
    torch.library.opcheck(torch.ops.transformer.bucketed_linear, (x, w, b))
    torch.library.opcheck(torch.ops.transformer.bucketed_linear, (x[:5], w, None))
    grad = torch.randn(200, N, dtype=torch.bfloat16)
    # a backward-only operator: no gradient of its own
    weight_grad = torch.ops.transformer.bucketed_weight_grad
    torch.library.opcheck(weight_grad, (grad, x.detach()))


@pytest.mark.parametrize("arch", ["transformer", "decoder_only"])
def test_model_training_step_unchanged(arch, monkeypatch):
    """A bf16 training step of the Transformer and of the decoder-only model:
    the same loss and gradients with and without bucketed rows (the batch has
    3 x 60 = 180 target rows, and 3 x 45 source rows)."""
    from transformer.config import DecoderOnlyConfig, TransformerConfig
    from transformer.models import create_model
    from transformer.training.loss import label_smoothed_loss

    sizes = dict(
        src_vocab_size=50, tgt_vocab_size=50, d_model=32, n_heads=4,
        decoder_layers=2, d_ff=64, dropout=0.0, attention_dropout=0.0,
        max_positions=128,
    )  # fmt: skip
    if arch == "transformer":
        cfg = TransformerConfig(encoder_layers=2, **sizes)
    else:
        cfg = DecoderOnlyConfig(**sizes)
    torch.manual_seed(0)
    model = create_model(cfg)
    src = torch.randint(4, 50, (3, 45))
    tgt = torch.randint(4, 50, (3, 61))

    def step(bucketed):
        monkeypatch.setattr(linear, "BUCKETED", bucketed)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(src, tgt[:, :-1])
        loss = label_smoothed_loss(logits, tgt[:, 1:], 0.1)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_on, grads_on = step(True)
    loss_off, grads_off = step(False)
    assert loss_on == pytest.approx(loss_off, rel=1e-2)
    for on, off in zip(grads_on, grads_off, strict=True):
        assert rel_err(on.double(), off.double()) < 5e-2


@pytest.mark.slow
def test_compiled_linear_matches_eager():
    """Through ``torch.compile`` (AOT autograd and inductor) the custom
    operators stay whole and give eager's output and gradients."""
    torch._dynamo.reset()
    x, w, b, up = operands(300)

    def fn(x, w, b):
        return F.relu(linear.linear(x, w, b)) * 2

    eager = run(fn, x, w, b, up, torch.bfloat16, True)
    compiled = run(torch.compile(fn, dynamic=True), x, w, b, up, torch.bfloat16, True)
    for e, c in zip(eager, compiled, strict=True):
        assert rel_err(c, e) < 1e-2
