"""Loading for decoding: the device a user names, a model or an ensemble from
checkpoints (its config and the tokenizer they share), cast to a decoding
precision, and the decoding settings each checkpoint's model refuses.
``transformer.inference`` builds ``Translator`` on these.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    model_weights,
    repeated_paths,
    same_tokenizer,
)
from transformer.config import Config, ConfigError, DecodingConfig
from transformer.models import Ensemble, create_model
from transformer.packed import pack_linear_layers
from transformer.precision import effective_precision, quantize_int8
from transformer.stepper import check_min_len
from transformer.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    ``option`` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{option}: {name!r} is not a device (auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: {name!r} asked for but CUDA is not available")
    return device


def load_model(
    path: str | Path, device: str | torch.device = "cpu", weights: str = "raw"
) -> tuple[nn.Module, Config, Tokenizer, dict]:
    """A ready-to-use model (eval mode), its config and tokenizer, from a checkpoint,
    and the checkpoint itself.

    Args:
        weights: ``raw`` (the trained weights) or ``ema`` (their moving average).
    """
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    try:
        model = create_model(cfg.model)
    except ValueError as e:  # e.g. no vocabulary sizes: no model's config
        raise CheckpointError(f"{path}: stored config is invalid: {e}") from e
    try:
        model.load_state_dict(model_weights(ckpt, path, weights))
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the stored config: {e}"
        ) from e
    try:
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
    except (TokenizerError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its stored tokenizer: {e}") from e
    return model.to(device).eval(), cfg, tokenizer, ckpt


def _check_same_direction(
    config: Config, path: str | Path, first: Config, first_path: str | Path
) -> None:
    """The models of an ensemble translate the same directions, tagged alike: a
    joint tokenizer lets a de->en and an en->de model load together, and their
    mean probability would be nonsense."""
    mine, theirs = config.data.directions(), first.data.directions()
    if mine != theirs or config.data.tag != first.data.tag:

        def name(cfg: Config, pairs: list[tuple[str, str]]) -> str:
            ways = ", ".join(f"{s}->{t}" for s, t in pairs)
            return ways + (f" (tag on the {cfg.data.tag})" if cfg.data.pairs else "")

        raise CheckpointError(
            f"{path} translates {name(config, mine)} and {first_path} "
            f"{name(first, theirs)}: the models of an ensemble must translate "
            "the same directions"
        )


def load_ensemble(
    paths: Sequence[str | Path],
    device: str | torch.device = "cpu",
    weights: str = "raw",
) -> tuple[nn.Module, Config, Tokenizer, list[dict[str, Any]]]:
    """One checkpoint's model as ``load_model`` gives it, or several as an
    ``Ensemble``; the first checkpoint's config (decoding defaults, data) and the
    tokenizer they must all share.

    Returns:
        the model, config, tokenizer, and per checkpoint what a report names:
        its path, step and, for an average, what went into it.
    """
    if not paths:
        raise CheckpointError("no checkpoint given")
    for path in repeated_paths(list(paths)):
        log.warning(
            "%s is given twice: the ensemble counts its probabilities twice", path
        )
    models, infos = [], []
    cfg = tokenizer = first_tokenizer = None
    for path in paths:
        model, config, tok, ckpt = load_model(path, device, weights)
        if first_tokenizer is None:
            cfg, tokenizer, first_tokenizer = config, tok, ckpt["tokenizer"]
        elif not same_tokenizer(ckpt["tokenizer"], first_tokenizer):
            raise CheckpointError(
                f"{path} and {paths[0]} have different tokenizers: the models of "
                "an ensemble must share one SentencePiece model"
            )
        else:
            _check_same_direction(config, path, cfg, paths[0])
        models.append(model)
        keys = ("step", "averaged_from", "averaged_steps")
        infos.append(
            {"checkpoint": str(path), **{k: ckpt[k] for k in keys if k in ckpt}}
        )
        del ckpt  # the optimizer state of each is not needed: free it as we go
    if len(models) == 1:
        return models[0], cfg, tokenizer, infos
    return Ensemble(models).eval(), cfg, tokenizer, infos


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Cast a loaded model for decoding (``decoding.precision``): bf16 weights and
    activations use the bf16 matmuls of AVX-512 CPUs and GPUs; int8 quantizes the
    linear layers (CPU only, ``precision.quantize_int8``); the search still ranks
    float32 log-probabilities. Without native bf16 (``precision.native_bf16``)
    bf16 stays float32, with a warning. On a CPU, bf16 linear layers keep their
    weights packed for oneDNN (``packed.pack_linear_layers``)."""
    device = next(model.parameters()).device
    if precision == "int8":
        if device.type != "cpu":
            raise ConfigError(
                f"decoding.precision: int8 decodes on a CPU (this model is on "
                f"{device}); use bf16 on a GPU"
            )
        return quantize_int8(model)
    if effective_precision(device, precision, "decoding.precision") == "bf16":
        model.to(torch.bfloat16)
        if device.type == "cpu":
            pack_linear_layers(model)
    return model


def check_decoding(
    dcfg: DecodingConfig, model: nn.Module, checkpoints: Sequence[str | Path]
) -> None:
    """Decoding settings each checkpoint's model (alone or in an ensemble) refuses,
    refused as the config refuses them, naming the checkpoint: ``decoding.compile``
    for an architecture that cannot compile, a ``decoding.min_len`` no output of the
    model can reach."""
    members = getattr(model, "models", [model])
    for path, member in zip(checkpoints, members, strict=True):
        refusal = member.cfg.compile_refusal()
        if dcfg.compile and refusal is not None:
            raise ConfigError(
                f"decoding.compile: true is not supported for {path} "
                f"(model.arch: {member.cfg.arch}: {refusal})"
            )
        check_min_len(dcfg.min_len, member.cfg.max_positions, str(path))
