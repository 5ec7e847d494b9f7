"""The training objective: label-smoothed cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transformer.config import PAD_ID


def label_smoothed_loss(
    logits: torch.Tensor, target: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Summed cross-entropy against (1 - eps) one-hot + eps / V uniform, pads ignored.

    Args:
        logits: (B, T, V); target: (B, T) with ``PAD_ID`` where there is no token.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(),  # (B * T, V)
        target.flatten(),
        ignore_index=PAD_ID,
        label_smoothing=epsilon,
        reduction="sum",
    )
