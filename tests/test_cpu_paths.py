"""CPU-only speed paths must not change what is computed: the dropout mask drawn
from random bits, bf16 training's attention by the plain math, and the allocator
setting that keeps freed memory mapped."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformer.dropout as dropout_module
from transformer import attention
from transformer.allocator import (
    KERNEL_CACHES,
    bound_kernel_caches,
    reuse_freed_memory,
)
from transformer.attention import SelfAttention, reference_attention
from transformer.dropout import Dropout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[True, False], ids=["bits", "torch"])
def dropout_path(request, monkeypatch):
    """Both CPU paths: the random-bits mask and torch's own."""
    monkeypatch.setattr(dropout_module, "BITS", request.param)
    return request.param


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_drops_at_rate_p_and_scales_the_rest(dropout_path, p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # never 0, so a 0 out means dropped
    y = Dropout(p).train()(x)
    dropped = y == 0
    n = x.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sd
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
    # the halves of one random word are independent: pairs dropped together at p^2
    pairs = dropped.flatten().view(-1, 2).all(dim=1).float().mean().item()
    assert abs(pairs - p * p) < 5 * (p * p * (1 - p * p) / (n / 2)) ** 0.5


def test_dropout_gradient_is_its_mask_scaled(dropout_path):
    torch.manual_seed(1)
    x = (torch.rand(64, 33) + 0.5).requires_grad_()
    y = Dropout(0.25).train()(x)
    g = torch.randn_like(y)
    y.backward(g)
    kept = (y != 0).to(x.dtype)
    torch.testing.assert_close(x.grad, g * kept / 0.75)


def test_dropout_is_seeded_and_off_in_eval(dropout_path):
    x = torch.randn(7, 11, 13)
    d = Dropout(0.3).train()
    torch.manual_seed(5)
    first = d(x)
    torch.manual_seed(5)
    assert torch.equal(d(x), first)
    assert not torch.equal(d(x), first)  # the generator moved on
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert (Dropout(1.0).train()(x) == 0).all()


def test_dropout_keeps_dtype_and_odd_sizes(dropout_path):
    for shape in [(1,), (3,), (5, 7), (2, 3, 5)]:
        x = torch.ones(shape, dtype=torch.bfloat16)
        y = Dropout(0.5).train()(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert set(y.unique().tolist()) <= {0.0, 2.0}


def test_attention_dropout_drops_weights_at_rate_p_and_is_unbiased(dropout_path):
    """Training attention with dropout (our mask on the bits path, SDPA's
    otherwise): averaged over draws it is the eval output, masked keys never
    contribute, and the draw is seeded."""
    torch.manual_seed(2)
    attn = SelfAttention(16, 2, dropout=0.25)
    x = torch.randn(3, 6, 16)

    def run(x):
        return attn.attend(*attn.project(x), mask, False)

    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False  # sentence 0 has 4 real tokens
    attn.eval()
    with torch.no_grad():
        expected = run(x)
    attn.train()
    torch.manual_seed(3)
    first = run(x)
    torch.manual_seed(3)
    assert torch.equal(run(x), first)
    with torch.no_grad():
        draws = torch.stack([run(x) for _ in range(3000)])
    assert not torch.allclose(draws[0], expected, atol=1e-3)
    torch.testing.assert_close(draws.mean(0), expected, atol=0.03, rtol=0)
    # a padded key's value never reaches the output, with or without dropout
    xp = x.clone()
    xp[0, 4:] += 100.0
    torch.manual_seed(3)
    torch.testing.assert_close(run(xp)[0, :4], first[0, :4])


def attention_and_grads(q, k, v, mask, causal, path):
    """Output and q/k/v gradients of ``SelfAttention.attend`` (without its output
    projection) on copies of q, k, v, by ``path`` ("sdpa" or "math")."""
    layer = SelfAttention(q.size(1) * q.size(3), q.size(1), dropout=0.0).train()
    layer.out_proj = torch.nn.Identity()
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    keys = attention.MATH_KEYS
    if path == "sdpa":  # too many keys for the math: SDPA
        attention.MATH_KEYS = 0
    try:
        out = layer.attend(q, k, v, mask, causal)
    finally:
        attention.MATH_KEYS = keys
    g = torch.Generator().manual_seed(0)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return [out.double(), *(x.grad.double() for x in (q, k, v))]


@pytest.mark.parametrize("causal", [False, True], ids=["padded", "causal"])
def test_bf16_training_attention_by_the_math_is_close_to_float64(causal, monkeypatch):
    """bf16 CPU attention under autograd, with no dropout, runs the plain math
    (SDPA's bf16 kernel trains several times slower there), as with dropout:
    its output and gradients are within a few bf16 roundings of float64.
    Float32, inference, too many keys: SDPA."""
    g = torch.Generator().manual_seed(1)
    q, k, v = ((torch.randn(5, 4, 12, 16, generator=g) * 2) for _ in range(3))
    mask = None
    if not causal:
        mask = torch.ones(5, 1, 1, 12, dtype=torch.bool)
        mask[::2, ..., 8:] = False
    calls = []
    real = attention.attention_weights
    monkeypatch.setattr(
        attention, "attention_weights", lambda *a: calls.append(1) or real(*a)
    )
    bf16 = [x.to(torch.bfloat16) for x in (q, k, v)]
    math = attention_and_grads(*bf16, mask, causal, "math")
    assert len(calls) == 1
    sdpa = attention_and_grads(*bf16, mask, causal, "sdpa")
    assert len(calls) == 1  # SDPA beyond MATH_KEYS
    exact = attention_and_grads(*(x.double() for x in bf16), mask, causal, "math")
    assert len(calls) == 1  # float64: SDPA, the float64 reference
    # the output and each gradient: within a few bf16 roundings (2^-9 relative
    # each) of float64, as the bf16 scores and weights round; SDPA, which keeps
    # its scores in float32, is up to twice as close
    for ours, theirs, want in zip(math, sdpa, exact, strict=True):
        error = (ours - want).abs().mean()
        assert error <= 0.01 * want.abs().mean()
        assert error <= 3 * (theirs - want).abs().mean()
    # the reference itself is the formula
    weights_out, _ = reference_attention(*(x.double() for x in bf16), mask, causal)
    torch.testing.assert_close(exact[0], weights_out.transpose(1, 2).flatten(2))
    # evaluation mode under autograd (a score's gradient): the math, no dropout
    calls.clear()
    layer = SelfAttention(64, 4, dropout=0.5).eval()
    layer.out_proj = torch.nn.Identity()
    q, k, v = (x.detach().clone().requires_grad_() for x in bf16)
    torch.testing.assert_close(
        layer.attend(q, k, v, mask, causal), math[0].to(torch.bfloat16).view(5, 12, 64)
    )
    assert len(calls) == 1
    # when: bf16 under autograd up to MATH_KEYS keys; not float32, not inference
    q, k = (x.requires_grad_() for x in bf16[:2])
    assert attention.trains_faster_by_math(q, k)
    assert not attention.trains_faster_by_math(q.float(), k.float())
    with torch.no_grad():
        assert not attention.trains_faster_by_math(q, k)
    long = torch.zeros(5, 4, attention.MATH_KEYS + 1, 16, dtype=torch.bfloat16)
    assert not attention.trains_faster_by_math(q, long)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc setting: Linux only"
)
def test_a_freed_block_is_reused_without_page_faults():
    if not reuse_freed_memory():
        pytest.skip("this libc has no mallopt (not glibc)")
    assert reuse_freed_memory()  # idempotent
    size = 128 * 2**20  # far above glibc's largest mmap threshold (32 MiB)
    pages = size // 4096
    faults = []
    for _ in range(8):  # as training steps do: allocate, touch, free
        before = minor_faults()
        torch.ones(size // 4)
        faults.append(minor_faults() - before)
    # mapped afresh each time, every page would fault once when touched
    assert min(faults[2:]) < pages // 10, faults


FAULTS_AFTER_LOAD = """
import resource, sys, torch
from transformer.inference import Translator
if sys.argv[1] == "load":
    Translator.load([sys.argv[2]], "cpu")
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(32 * 2**20)  # 128 MiB, touched and freed, as a decoding step's
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc setting: Linux only"
)
def test_a_process_that_loads_a_translator_reuses_freed_memory():
    model = ROOT / "models" / "multi30k_de_en_tiny_a.safetensors"
    faults = {}
    for mode in ("load", "plain"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_AFTER_LOAD, mode, str(model)],
            capture_output=True,
            text=True,
            check=True,
        )
        faults[mode] = int(out.stdout.split()[-1])
    pages = 128 * 2**20 // 4096
    assert faults["plain"] > pages // 2  # mapped afresh: every page faults
    assert faults["load"] < pages // 10, faults


def test_kernel_caches_are_bounded_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")  # the user's
    assert bound_kernel_caches(64) == {
        "LRU_CACHE_CAPACITY": "64",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024",
    }
    assert set(KERNEL_CACHES) == {
        "LRU_CACHE_CAPACITY",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
    }
    for name in KERNEL_CACHES:
        monkeypatch.delenv(name)
    assert bound_kernel_caches() == {
        "LRU_CACHE_CAPACITY": "64",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "192",
    }


REUSE = """
import sys, torch
torch.set_num_threads(1)
from transformer.allocator import bound_kernel_caches
bound_kernel_caches(None if sys.argv[1] == "default" else int(sys.argv[1]))
weights = [torch.randn(n, 256, dtype=torch.bfloat16) for n in range(64, 577, 64)]
x = torch.randn(1280, 256, dtype=torch.bfloat16)
shape = 0
for cycle in range(2):
    print("=== cycle", cycle, flush=True)
    for rows in range(128, 1281, 128):  # the body sizes batches meet
        for w in weights:
            x[:rows] @ w.t()
        shape += 1  # an attention product of a shape not seen before
        q = torch.randn(4 + shape, 7, 64, dtype=torch.bfloat16)
        torch.bmm(q, q.transpose(1, 2))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="oneDNN's verbose output"
)
def test_the_linear_layers_kernels_stay_cached_from_one_body_size_to_the_next():
    """90 bf16 products a cycle (9 weights x 10 row counts, and one attention
    product of a new shape each time), the same cycle twice: with the training
    bounds the second cycle finds every linear product's kernel in the cache;
    a 64-entry cache (the bound before) has dropped them all. Where the CPU's
    bf16 products do not run in oneDNN, nothing is built either way."""
    import subprocess

    def kernel_builds(entries: str) -> tuple[int, int]:
        """(kernels built in all, linear products' built in the second cycle)"""
        env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHES}
        env["ONEDNN_VERBOSE"] = "profile_create"
        out = subprocess.run(
            [sys.executable, "-c", REUSE, entries],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        second = out.split("=== cycle 1")[1].splitlines()
        builds = [line for line in out.splitlines() if "create:cache_miss" in line]
        linear = [
            line
            for line in second
            if "create:cache_miss" in line and "x256:256x" in line
        ]
        return len(builds), len(linear)

    default_builds, default_linear = kernel_builds("default")
    small_builds, small_linear = kernel_builds("64")
    if small_builds:  # this CPU's bf16 products run in oneDNN
        assert default_linear == 0
        assert small_linear == 90
    else:
        assert default_builds == 0


GROWTH = """
import sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "bound":
    from transformer.allocator import bound_kernel_caches
    bound_kernel_caches(16)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = torch.randn(256, 512, dtype=torch.bfloat16)
x = torch.randn(700, 256, dtype=torch.bfloat16)
x[:10] @ w
base = rss()
for m in range(500, 700):
    x[:m] @ w
print(rss() - base)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/statm"
)
def test_bounded_kernel_caches_keep_bf16_products_of_new_shapes_from_growing_memory():
    """200 bf16 products of 200 row counts: where the CPU's bf16 products keep a
    kernel per shape (oneDNN), the bounded caches keep well under half the growth
    of the default ones; elsewhere neither grows."""
    import subprocess

    def growth(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", GROWTH, mode],
            capture_output=True,
            text=True,
            check=True,
            env={k: v for k, v in os.environ.items() if k not in KERNEL_CACHES},
        )
        return float(out.stdout.split()[-1])

    plain, bound = growth("plain"), growth("bound")
    if plain > 40:  # MiB: per-shape kernels (this CPU's bf16 runs in oneDNN)
        assert bound < plain / 2
    else:
        assert bound <= plain + 20


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's tunables: Linux with glibc only",
)
def test_training_runs_again_in_place_with_glibcs_thread_cache_off():
    from transformer.allocator import THREAD_CACHE_OFF

    show = (
        "import os, sys; from transformer.allocator import without_thread_cache; "
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
        "without_thread_cache(); print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))"
    )

    def lines(**tunables: str) -> list[list[str]]:
        """The program's printed lines, each (pid, GLIBC_TUNABLES)."""
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        out = subprocess.run(
            [sys.executable, "-c", show],
            env={**env, **tunables},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line.split(" ", 1) for line in out.splitlines()]

    out = lines()
    # the same process, run again from the start with the tunable: the first
    # print is from before the exec, the next two from after it
    first, again, after = out
    assert first == [first[0], "None"]
    assert again == [first[0], THREAD_CACHE_OFF] and after == again
    # a user's own GLIBC_TUNABLES stands: no exec
    own = lines(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert [tunables for _, tunables in own] == ["glibc.malloc.check=0"] * 2


def test_transformer_train_turns_the_thread_cache_off_and_a_library_call_does_not(
    monkeypatch, tmp_path
):
    import transformer.allocator as allocator
    from transformer.cli.train import train_main

    calls = []
    monkeypatch.setattr(allocator, "without_thread_cache", lambda: calls.append(1))
    missing = str(tmp_path / "missing.yaml")
    assert train_main(["--config", missing]) == 2  # a call with arguments
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["transformer-train", "--help"])
    with pytest.raises(SystemExit):  # --help (the reference pages, in-process)
        train_main()
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["transformer-train", "--config", missing])
    assert train_main() == 2  # the program: the exec, then the error
    assert calls == [1]


def test_without_an_interpreter_to_run_again_training_goes_on(monkeypatch):
    import transformer.allocator as allocator

    def fail(*args):
        raise FileNotFoundError(args[0])

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(allocator.os, "execve", fail)
    assert allocator.without_thread_cache() is None
