"""Numeric precision: whether bf16 runs natively here, and autocast for training.

bf16 on a CPU without bf16 instructions (AVX-512-bf16 or AMX on x86, the bf16
extension on Arm) is emulated in float32 arithmetic plus conversions, several times
slower than float32 itself; ``precision: bf16`` then falls back to fp32 with a
warning instead. ``precision: auto``, the training default, picks bf16 only where it
is native: on the reference de->en config it kept float32's validation BLEU over
3,000 updates (+0.22 at 3,000, never more than 0.08 below; the benchmarks page).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# the CPU flags that decide bf16, and the one that decides fast float32
FLAGS = ("avx2", "avx512_bf16", "amx_bf16", "bf16")
_logged: set[tuple[str, ...]] = set()


def cpu_flags() -> dict[str, bool]:
    """This CPU's ``FLAGS``: from torch's cpuinfo reading (torch >= 2.8) or, before
    that, from the flags (x86) / features (Arm) lines of /proc/cpuinfo."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return {flag: bool(found.get(flag, False)) for flag in FLAGS}
    words: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                words.update(value.split())
    return {flag: flag in words for flag in FLAGS}


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` compute in bf16 natively (not by emulation)?"""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere on
    if device.type == "cpu":
        flags = cpu_flags()
        return flags["avx512_bf16"] or flags["amx_bf16"] or flags["bf16"]
    return True  # other backends decide for themselves


def effective_precision(device: torch.device, precision: str, key: str) -> str:
    """``precision``, or fp32 (with a warning, once) for bf16 without native bf16;
    ``auto`` is bf16 where ``device`` has native bf16 and fp32 elsewhere (logged
    once).

    Args:
        key: the config key that asked for it, for the warning.
    """
    if precision == "auto":
        chosen = "bf16" if native_bf16(device) else "fp32"
        if (key, device.type, "auto") not in _logged:
            _logged.add((key, device.type, "auto"))
            log.info(
                "%s: auto -> %s (this %s has %snative bf16)",
                key,
                chosen,
                "GPU" if device.type == "cuda" else device.type.upper(),
                "" if chosen == "bf16" else "no ",
            )
        return chosen
    if precision != "bf16" or native_bf16(device):
        return precision
    if (key, device.type) not in _logged:
        _logged.add((key, device.type))
        what = "CPU (no AVX-512-bf16, AMX or Arm bf16)"
        if device.type == "cuda":
            what = "GPU (compute capability below 8.0)"
        log.warning(
            "%s: bf16 asked for, but this %s has no native bf16: running fp32 "
            "instead of emulated bf16",
            key,
            what,
        )
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (fp32: none) on ``device``; pass it
    through ``effective_precision`` first, once, outside compiled code."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (or each model of an ensemble) for int8 decoding on a CPU, in
    place: its linear layers hold int8 weights quantized per output channel (its
    recurrent layers per tensor), and quantize their inputs per batch (PyTorch's dynamic
    quantization, FBGEMM / oneDNN kernels, VNNI where the CPU has it). A tied
    output projection, the target embedding used as the output layer, becomes a
    linear layer of its own first: it is the largest matrix product of a decoding
    step. Embeddings, norms and the search stay float32."""
    import warnings

    from torch import nn

    for member in getattr(model, "models", [model]):
        if getattr(member, "output_proj", True) is None:
            weight = member.tgt_embed.weight
            proj = nn.Linear(weight.size(1), weight.size(0), bias=False)
            proj.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            member.output_proj = proj
    with warnings.catch_warnings():
        # torch.ao's dynamic quantization is deprecated in favour of torchao,
        # whose CPU int8 path needs torch.compile; it still runs in the torch
        # this project pins
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        quant = torch.ao.quantization
        torch.ao.quantization.quantize_dynamic(
            model,
            {
                nn.Linear: quant.per_channel_dynamic_qconfig,
                nn.LSTM: quant.default_dynamic_qconfig,
                nn.GRU: quant.default_dynamic_qconfig,
            },
            dtype=torch.qint8,
            inplace=True,
        )
    return model
