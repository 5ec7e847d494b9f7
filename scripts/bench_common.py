"""Helpers shared by the benchmarks: the machine, peak memory, and the
arithmetic side (FLOP formulas for CPU attention, the same-dtype matmul rate)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_run(run, repeats: int) -> tuple[dict, object]:
    """``run()`` timed ``repeats`` times: {"seconds": the median, "seconds_runs":
    each (when more than one)}, and the last run's output."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        runs.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(runs),
        **({"seconds_runs": runs} if repeats > 1 else {}),
    }, out


def timed(
    model, tokenizer, sources, refs, dcfg, device, repeats=1, use_cache=True
) -> dict:
    """One warm-up on 16 sentences, then all of them ``repeats`` times: the
    median seconds (each run's in ``seconds_runs``); BLEU of the output."""
    from transformer.evaluation import score_corpus
    from transformer.inference import translate

    translate(model, tokenizer, sources[:16], dcfg, device, use_cache)
    row, out = median_run(
        lambda: translate(model, tokenizer, sources, dcfg, device, use_cache), repeats
    )
    return {
        **row,
        "sentences_per_s": len(sources) / row["seconds"],
        "bleu": score_corpus([h[0].text for h in out], refs)["bleu"],
        "peak_rss_mib": peak_rss_mib(),
    }


def machine() -> dict:
    """The machine and the settings a run's speed depends on: CPU flags, threads,
    versions, and the bf16 kernel caches' bounds in force (``None``: the
    libraries' default, 1,024; a training process sets them,
    ``allocator.bound_kernel_caches``)."""
    from transformer.allocator import KERNEL_CACHES
    from transformer.precision import cpu_flags, native_bf16

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "kernel_caches": {name: os.environ.get(name) for name in KERNEL_CACHES},
        # glibc's tunables in force (transformer-train: its thread cache off)
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def sdpa_flop_mapping() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which torch's table lacks
    (the same formulas as its CUDA kernels: q k^T and weights @ v, and backward)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(q, k, v, *args, **kwargs) -> int:  # shapes (B, H, T, Dh)
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of a (1024 x 1024) @ (1024 x 1024) product in ``dtype``."""
    a, b = (torch.randn(1024, 1024, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    products, start = 0, time.perf_counter()
    while True:
        for _ in range(4):
            a @ b
        products += 4
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * 1024**3 * products / elapsed / 1e9


def recorded_products(step) -> list[tuple]:
    """The matrix products (``mm``, ``addmm``, ``bmm``) that ``step()`` runs, as
    (op, [(shape, stride, dtype) of each tensor argument]), in order. Products
    written into a given tensor (``out=``, ``addmm_``) are recorded as the plain
    op, and the bucketed linear layers' operators (``transformer.linear``) are
    looked into: their products are recorded, not the operator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from transformer.linear import IMPLEMENTATIONS

    aten = torch.ops.aten
    products = {
        aten.mm.default: aten.mm.default,
        aten.mm.out: aten.mm.default,
        aten.addmm.default: aten.addmm.default,
        aten.addmm.out: aten.addmm.default,
        aten.addmm_.default: aten.addmm.default,
        aten.bmm.default: aten.bmm.default,
    }

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in IMPLEMENTATIONS:  # run its Python body under this mode
                with self:
                    return IMPLEMENTATIONS[func](*args, **(kwargs or {}))
            if func in products:
                self.calls.append(
                    (
                        products[func],
                        [
                            (tuple(a.shape), a.stride(), a.dtype)
                            for a in args
                            if isinstance(a, torch.Tensor)
                        ],
                    )
                )
            return func(*args, **(kwargs or {}))

    with Record() as record:
        step()
    return record.calls


def products_alone(
    calls: list[tuple], device: torch.device, seconds_each: float = 0.05
) -> tuple[float, float]:
    """(FLOPs, seconds) of ``calls`` (``recorded_products``) run alone, each
    distinct one timed with operands of its own shapes, strides (a transposed
    operand stays transposed) and dtype: what the step's products cost with
    nothing else in the step."""
    distinct: dict[tuple, int] = {}
    for func, operands in calls:
        key = (func, tuple(operands))
        distinct[key] = distinct.get(key, 0) + 1
    flops = seconds = 0.0
    for (func, operands), count in distinct.items():
        args = [
            torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()
            for shape, stride, dtype in operands
        ]
        *_, a, b = args  # addmm: (bias, a, b)
        inner = a.shape[-1]
        out = a.shape[:-1] + b.shape[-1:]
        per_call = 2 * inner * torch.Size(out).numel()
        for _ in range(2):
            func(*args)
        synchronize(device)
        runs, start = 0, time.perf_counter()
        while True:
            func(*args)
            runs += 1
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds_each:
                break
        flops += per_call * count
        seconds += elapsed / runs * count
    return flops, seconds
