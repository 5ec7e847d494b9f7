"""The typed key/value cache for incremental decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LayerCache:
    """One decoder layer's state: self-attention K/V grow, cross K/V are fixed."""

    self_k: Tensor | None = None  # (B, H, T, Dh)
    self_v: Tensor | None = None
    cross_k: Tensor | None = None  # (B, H, S, Dh), projected once per source
    cross_v: Tensor | None = None


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
        self._select(("self_k", "self_v"), index)
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
