"""An ensemble of models behind the decoding protocol of ``models.common``.

``Ensemble.decode`` returns the log of the mean of the models' next-token
probabilities. That is already a log-distribution (``log_softmax`` leaves it
unchanged), so the search, which applies ``log_softmax`` to whatever ``decode``
returns, decodes an ensemble exactly as it decodes one model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class EnsembleMemory:
    """One encoder output per model, selected together."""

    memories: list[Any]

    def index_select(self, index: Tensor) -> EnsembleMemory:
        return EnsembleMemory([m.index_select(index) for m in self.memories])


@dataclass
class EnsembleState:
    """One decoding state per model, reordered together."""

    states: list[Any]

    @property
    def length(self) -> int:
        """Target positions consumed (the search reads it to decide when to
        switch to the compiled step); the same for every model."""
        return getattr(self.states[0], "length", 0)

    def reorder(
        self, index: Tensor, sources: Tensor | None = None, keep_sources: bool = False
    ) -> None:
        """Keep rows ``index`` in every model's state (see ``KVCache.reorder``)."""
        for state in self.states:
            state.reorder(index, sources, keep_sources)


class Ensemble(nn.Module):
    """Several models that share one tokenizer, decoded as one.

    The models may differ in architecture; their vocabularies must be the same.
    ``cfg`` is the config of the member that reads the fewest pieces, with
    ``max_positions`` the smallest of all, so that ``cfg.max_pieces()`` fits
    every model; ``target_positions`` is the smallest over the models.

    Args:
        models: at least one model following the decoding protocol.

    Shape:
        src: (B, S) source ids.
        tgt: (B, T) target ids.
        decode output: (B, T, V) float32 log-probabilities of the mean.
    """

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        first = models[0].cfg
        for i, model in enumerate(models[1:], start=2):
            sizes = (model.cfg.src_vocab_size, model.cfg.tgt_vocab_size)
            if sizes != (first.src_vocab_size, first.tgt_vocab_size):
                raise ValueError(
                    f"model {i} has vocabularies {sizes}, model 1 "
                    f"{(first.src_vocab_size, first.tgt_vocab_size)}: an ensemble "
                    "needs one tokenizer"
                )
        self.models = nn.ModuleList(models)
        # the member that reads the fewest pieces (a decoder_only model halves its
        # positions), with the fewest positions of all: its max_pieces() fits all
        narrowest = min((m.cfg for m in models), key=lambda c: c.max_pieces())
        self.cfg = dataclasses.replace(
            narrowest, max_positions=min(m.cfg.max_positions for m in models)
        )

    def encode(self, src: Tensor) -> EnsembleMemory:
        """(B, S) source ids -> every model's memory."""
        return EnsembleMemory([model.encode(src) for model in self.models])

    def decode(
        self,
        tgt: Tensor,
        memory: EnsembleMemory,
        cache: EnsembleState | None = None,
    ) -> Tensor:
        """Target ids -> log of the models' mean next-token probabilities (B, T, V).

        The mean is taken in float32 whatever the models' dtype, as the logsumexp
        of their log-probabilities minus log(n). One model's logits are returned
        as they are: their ``log_softmax`` is the same distribution, and an
        ensemble of one then decodes bit-identically to the model.
        """
        states = [None] * len(self.models) if cache is None else cache.states
        outputs = [
            model.decode(tgt, mem, state)
            for model, mem, state in zip(
                self.models, memory.memories, states, strict=True
            )
        ]
        if len(outputs) == 1:
            return outputs[0]
        logp = torch.stack(
            [torch.log_softmax(out.float(), dim=-1) for out in outputs]
        )  # (N, B, T, V)
        return torch.logsumexp(logp, dim=0) - math.log(len(outputs))

    def target_positions(self, src: Tensor) -> Tensor:
        """(B, S) sources -> (B,) target positions every model still has."""
        limits = torch.stack([m.target_positions(src) for m in self.models])
        return limits.amin(dim=0)

    def new_cache(self) -> EnsembleState:
        return EnsembleState([model.new_cache() for model in self.models])

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: the ensemble's log-probabilities at every position."""
        return self.decode(tgt_in, self.encode(src))
