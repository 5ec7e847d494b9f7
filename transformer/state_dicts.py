"""State dicts as plain data: which names share one tensor (tied weights), casts
that keep them shared, and a check for NaN or infinite weights."""

from __future__ import annotations

import torch


def non_finite_weights(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [
        name
        for name, value in state_dict.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def tied_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each name whose tensor is another's (tied embeddings, saved once) -> the
    first name that holds it."""
    first: dict[tuple, str] = {}
    alias = {}
    for name, v in state.items():
        if v.numel() == 0:
            continue
        where = (
            v.untyped_storage().data_ptr(),
            v.storage_offset(),
            v.shape,
            v.stride(),
        )
        alias[name] = first.setdefault(where, name)
    return {name: to for name, to in alias.items() if name != to}


def retie(out: dict[str, torch.Tensor], tied: dict[str, str]) -> dict:
    """Point tied names at one tensor again, so that torch.save writes it once."""
    for name, to in tied.items():
        out[name] = out[to]
    return out


def cast_weights(
    state: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype`` (no copy where they already are), the
    others as they are; tied names stay one tensor, cast once."""
    tied = tied_names(state)
    out = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in state.items()
        if k not in tied
    }
    return retie(out, tied)
