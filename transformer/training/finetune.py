"""Fine-tuning: a new run that starts from another checkpoint's weights and
tokenizer (``training.init_from``): a file of ours, or a transformers MarianMT
folder or Hub name (``transformer.hf.importing``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transformer.checkpoint import (
    CheckpointError,
    check_compatible,
    checkpoint_config,
    load_checkpoint,
    model_weights,
)
from transformer.config import Config, ModelConfig
from transformer.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)


@dataclass
class InitSource:
    """What a fine-tuning run takes from ``training.init_from``."""

    path: Path
    tokenizer: Tokenizer
    model_cfg: ModelConfig  # the architecture it was trained with
    weights: dict[str, torch.Tensor]
    which: str  # raw or ema (``training.init_weights``)

    def check(self, cfg: Config) -> None:
        """Refuse a config whose architecture differs (dropout may change)."""
        check_compatible(self.model_cfg, cfg.model, f"training.init_from {self.path}")

    def load_into(self, model: nn.Module) -> None:
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as e:
            raise CheckpointError(
                f"training.init_from {self.path}: weights do not fit the model: {e}"
            ) from e
        log.info(
            "fine-tuning: %s weights and tokenizer from %s",
            self.which,
            self.path,
        )


def load_init(cfg: Config) -> InitSource:
    """Read ``training.init_from``: its tokenizer replaces the one the data
    section would build or load, so that the data is tokenized as it was."""
    t = cfg.training
    path = Path(t.init_from)
    try:  # a file of ours, or a transformers MarianMT folder or Hub name
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"training.init_from: {e}") from None
    tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
    if _other_tokenizer(cfg, tokenizer):
        log.warning(
            "data.tokenizer's model files are ignored: a fine-tuning run uses the "
            "tokenizer of training.init_from (%s)",
            path,
        )
    return InitSource(
        path,
        tokenizer,
        checkpoint_config(ckpt, path).model,
        model_weights(ckpt, path, t.init_weights, "training.init_weights=raw"),
        t.init_weights,
    )


def _other_tokenizer(cfg: Config, tokenizer: Tokenizer) -> bool:
    """Does the config name SentencePiece files other than ``tokenizer``'s?"""
    tcfg = cfg.data.tokenizer
    if not (tcfg.model or tcfg.src_model):
        return False
    try:
        return Tokenizer.from_files(tcfg).hash() != tokenizer.hash()
    except TokenizerError:
        return True
