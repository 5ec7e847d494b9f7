"""CPU-only speed paths must not change what is computed: the dropout mask drawn
from random bits, and the allocator setting that keeps freed memory mapped."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformer.dropout as dropout_module
from transformer.allocator import (
    KERNEL_CACHES,
    bound_kernel_caches,
    reuse_freed_memory,
)
from transformer.attention import SelfAttention
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
