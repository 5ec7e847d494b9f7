"""The typed key/value cache for incremental decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """One decoder layer's state: self-attention K/V grow, cross K/V are fixed.

    A reorder of the self-attention K/V is kept pending (``rows``) and applied by the
    next ``extend``, which gathers the kept rows straight into the grown tensors: one
    copy per step instead of a concatenation plus a gather (beam search reorders
    every step).
    """

    self_k: Tensor | None = None  # (B, H, T, Dh), before ``rows`` is applied
    self_v: Tensor | None = None
    cross_k: Tensor | None = None  # (B, H, S, Dh), projected once per source
    cross_v: Tensor | None = None
    rows: Tensor | None = None  # pending row selection of self_k / self_v

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions' k, v (B, H, T, Dh); return the whole K, V."""
        if self.self_k is None:
            self.self_k, self.self_v = k, v
        else:
            self.self_k = _gather_cat(self.self_k, k, self.rows)
            self.self_v = _gather_cat(self.self_v, v, self.rows)
        self.rows = None
        return self.self_k, self.self_v

    def select(self, index: Tensor) -> None:
        """Keep self-attention rows ``index`` (applied lazily, see ``extend``)."""
        if self.self_k is not None:
            self.rows = index if self.rows is None else self.rows.index_select(0, index)


def _gather_cat(past: Tensor, new: Tensor, rows: Tensor | None) -> Tensor:
    """cat([past[rows], new], dim=2) with a single copy of ``past``."""
    if rows is None:
        return torch.cat([past, new], dim=2)
    # out= supports neither autograd nor torch.compile (which fuses the two anyway)
    if past.requires_grad or new.requires_grad or torch.compiler.is_compiling():
        return torch.cat([past.index_select(0, rows), new], dim=2)
    b, (h, t, d) = rows.numel(), past.shape[1:]
    out = past.new_empty(b, h, t + new.size(2), d)
    torch.index_select(past, 0, rows, out=out[:, :, :t])
    out[:, :, t:] = new
    return out


@dataclass
class KVCache:
    """Decoder state passed explicitly to ``Transformer.decode``.

    ``length`` counts the target positions consumed so far (the position offset of
    the next token). ``memory_mask`` (B, S) is taken from the encoder output on the
    first call, so that after ``reorder`` the cache alone describes the batch.
    """

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0
    memory_mask: Tensor | None = None

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls(layers=[LayerCache() for _ in range(n_layers)])

    def reorder(
        self, index: Tensor, sources: Tensor | None = None, keep_sources: bool = False
    ) -> None:
        """Keep target rows ``index`` (B',) in that order: beams, or dropping rows.

        By default the cross-attention keys/values and the source mask follow the
        same rows. With ``sources`` (N',) they keep those source rows instead, each
        shared by B' / N' consecutive target rows (the beams of one sentence; see
        ``MultiHeadAttention.attend``); ``keep_sources`` leaves them as they are.
        """
        for layer in self.layers:
            layer.select(index)
        if not keep_sources:
            self._select(("cross_k", "cross_v"), index if sources is None else sources)
            if self.memory_mask is not None:
                rows = index if sources is None else sources
                self.memory_mask = self.memory_mask.index_select(0, rows)

    def _select(self, names: tuple[str, ...], index: Tensor) -> None:
        for layer in self.layers:
            for name in names:
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, index))
