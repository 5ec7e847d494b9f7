"""Checkpoint averaging (``transformer-average``): the mean of several checkpoints'
weights, or one checkpoint's weights alone, written as a new checkpoint without
training state, optionally in float16 for publishing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    architecture_diffs,
    checkpoint_config,
    load_checkpoint,
    model_weights,
    repeated_paths,
    same_tokenizer,
    save_weights_file,
)
from transformer.config import ModelConfig
from transformer.state_dicts import (
    cast_weights,
    non_finite_weights,
    retie,
    tied_names,
)


def _check_same_model(
    ckpt: dict[str, Any],
    path: str | Path,
    tokenizer: dict[str, torch.Tensor],
    theirs: ModelConfig,
    first_path: str | Path,
) -> None:
    """Weights to average must mean the same thing: one tokenizer (the same piece
    behind each id) and one architecture (``theirs``: the first checkpoint's)."""
    if not same_tokenizer(ckpt["tokenizer"], tokenizer):
        raise CheckpointError(
            f"{path} and {first_path} have different tokenizers: averaging their "
            "weights would mix different pieces under each id"
        )
    mine = checkpoint_config(ckpt, path).model
    differ = architecture_diffs(mine, theirs)
    if differ:
        key = differ[0]
        raise CheckpointError(
            f"{path} and {first_path} differ in model.{key} ({getattr(mine, key)!r} "
            f"vs {getattr(theirs, key)!r}): only one architecture's weights can be "
            "averaged"
        )


class _Mean:
    """The element-wise mean of state dicts added one at a time, summed in float64
    and returned in the first one's dtypes, tied weights (one tensor under several
    names in the first) averaged and returned once; ``what`` names the weights in
    errors."""

    def __init__(self, what: str) -> None:
        self.what, self.total, self.dtypes, self.first, self.n = what, None, {}, "", 0
        self.tied: dict[str, str] = {}

    def add(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        if self.total is None:
            self.tied = tied_names(state)
            self.total = {
                k: v.double().clone() for k, v in state.items() if k not in self.tied
            }
            self.dtypes = {k: v.dtype for k, v in state.items()}
            self.first = path
        else:
            if state.keys() != self.dtypes.keys() or any(
                state[k].shape != self.total[self.tied.get(k, k)].shape for k in state
            ):
                raise CheckpointError(
                    f"{path}: {self.what} weights differ in shape from {self.first}"
                )
            for k, v in self.total.items():
                v += state[k].double()
        self.n += 1

    def mean(self) -> dict[str, torch.Tensor]:
        out = {k: (v / self.n).to(self.dtypes[k]) for k, v in self.total.items()}
        return retie(out, self.tied)


def _to_half(state: dict[str, torch.Tensor], output: Path) -> dict[str, torch.Tensor]:
    """float16 weights. float16 rather than bfloat16: its 10 mantissa bits round
    a weight 8x more finely (relative error 2^-11 against 2^-8), and trained
    weights lie far inside its range (|w| < 65504), so a model cast back to float32
    decodes as before; bfloat16's wider range buys nothing here. Tied weights stay
    one tensor."""
    half = cast_weights(state, torch.float16)
    bad = non_finite_weights(half)
    if bad:
        raise CheckpointError(
            f"{output}: weights do not fit in float16 (beyond 65504): "
            + ", ".join(bad[:3])
        )
    return half


def _check_output(output: Path, inputs: set[Path]) -> None:
    """An average never replaces one of its inputs or a checkpoint a run resumes
    from: either would lose the optimizer state and data position for good."""
    if output.resolve() in inputs:
        raise CheckpointError(
            f"--output {output} is one of the inputs: write the average elsewhere"
        )
    if output.is_dir():
        raise CheckpointError(f"--output {output}: is a folder; name a file in it")
    if not output.is_file():
        return
    try:
        old = torch.load(output, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint: the user chose to replace it
        return
    if isinstance(old, dict) and "optimizer" in old:
        raise CheckpointError(
            f"--output {output}: holds a training checkpoint (optimizer state, data "
            "position) that a run resumes from; write the average elsewhere"
        )


def average_checkpoints(
    paths: list[str | Path],
    output: str | Path,
    weights: str = "raw",
    weights_only: bool = False,
    half: bool = False,
) -> Path:
    """Average the weights of several checkpoints of one run (or copy one) into a
    new checkpoint, which holds no optimizer, schedule, RNG or data position.

    Args:
        weights: which weights to average into ``model``: ``raw`` or ``ema``.
        weights_only: a file to publish: one set of weights, the config and the
            tokenizer. Otherwise, averaging ``raw`` weights, the EMA weights are
            averaged too (into ``ema``) when every input holds them.
        half: store the weights in float16 (``load_model`` casts them back).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    for path in repeated_paths(paths):
        raise CheckpointError(f"{path} is given twice: each counts once")
    _check_output(Path(output), {Path(p).resolve() for p in paths})
    model, ema = _Mean(weights), _Mean("ema")
    steps = []
    for path in paths:  # one at a time: a checkpoint holds its optimizer state too
        ckpt = load_checkpoint(path)
        if model.n == 0:
            config, tokenizer, first_path = ckpt["config"], ckpt["tokenizer"], path
            architecture = checkpoint_config(ckpt, path).model
        else:
            _check_same_model(ckpt, path, tokenizer, architecture, first_path)
        model.add(model_weights(ckpt, path, weights), path)
        if "ema" in ckpt:
            ema.add(ckpt["ema"], path)
        steps.append(ckpt.get("step", 0))
    out = {
        "format": FORMAT_VERSION,
        "model": model.mean(),
        "config": config,
        "tokenizer": tokenizer,
        "step": max(steps),  # the latest update that went into the average
        "averaged_from": [str(p) for p in paths],
        "averaged_steps": steps,
        "weights": weights,  # what ``model`` holds
        "weights_only": weights_only,
    }
    if not weights_only and weights == "raw" and ema.n == len(paths):
        out["ema"] = ema.mean()
    if half:
        for key in ("model", "ema"):
            if key in out:
                out[key] = _to_half(out[key], Path(output))
    save_weights_file(out, output)
    return Path(output)
