"""What every architecture shares: the decoding protocol, id checks and counts.

An architecture is an ``nn.Module`` with

- ``cfg``: its ``ModelConfig`` (``max_positions``, vocabulary sizes);
- ``encode(src) -> memory``: anything with ``index_select(index)`` (the uncached
  search keeps one memory row per hypothesis);
- ``decode(tgt, memory, state=None) -> logits (B, T, V)``: without a state, ``tgt``
  is the whole prefix; with one (from ``new_cache()``), only the new positions, and
  the state is extended in place;
- ``target_positions(src) -> (B,)``: how many target tokens each sentence may
  have (the search's length limit never passes it);
- ``new_cache()``: a decoding state with ``reorder(index, sources, keep_sources)``
  (see ``KVCache.reorder``) and ``length``, the target positions consumed;
- ``forward(src, tgt_in) -> logits``: teacher forcing, for training;
- ``alignment(src, tgt, layer) -> (H, T, S)``: the weights over source positions
  behind each target position, for attention plots.

``transformer.search`` knows this protocol and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.embeddings import TokenEmbedding


def check_ids(ids: Tensor, vocab_size: int, what: str) -> None:
    """Reject ids that are not a (B, T) integer tensor in [0, ``vocab_size``).

    On CPU in eager mode a bad id is a ``ValueError`` that names the range found.
    On other devices, and inside ``torch.compile``, the range check is
    ``torch._assert_async``: reading the minimum and maximum back would be a
    device-to-host sync on every forward (and a graph break), so the check runs on
    the device and a bad id fails the next synchronising call with the same
    message. Ids enter through the tokenizer (training data) and ``decode_corpus``
    (translation), which check them on the host.
    """
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(
            f"{what} ids must be a (B, T) integer tensor, "
            f"got {tuple(ids.shape)} {ids.dtype}"
        )
    in_range = ((ids >= 0) & (ids < vocab_size)).all()
    if ids.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(in_range, f"{what} ids must be in [0, {vocab_size})")
    elif not in_range:  # one read of a flag; on CPU there is no device to wait for
        low, high = ids.aminmax()
        raise ValueError(
            f"{what} ids must be in [0, {vocab_size}), "
            f"got range [{int(low)}, {int(high)}]"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def token_embeddings(cfg: ModelConfig) -> tuple[TokenEmbedding, TokenEmbedding]:
    """Check ``cfg`` and make the target and source embeddings (one module when
    ``tie_src_tgt_embeddings``), in that order."""
    cfg.validate()
    if cfg.src_vocab_size <= 0 or cfg.tgt_vocab_size <= 0:
        raise ValueError(
            "model.src_vocab_size and model.tgt_vocab_size must be set "
            f"(got {cfg.src_vocab_size}, {cfg.tgt_vocab_size})"
        )
    tgt = TokenEmbedding(cfg.tgt_vocab_size, cfg.d_model, cfg.pad_id)
    if cfg.tie_src_tgt_embeddings:
        return tgt, tgt
    return tgt, TokenEmbedding(cfg.src_vocab_size, cfg.d_model, cfg.pad_id)


def output_projection(cfg: ModelConfig) -> nn.Linear | None:
    """The (d_model -> V_tgt) output layer, or None when it is the tied target
    embedding (``tie_output_embeddings``)."""
    if cfg.tie_output_embeddings:
        return None
    proj = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
    nn.init.normal_(proj.weight, std=cfg.d_model**-0.5)
    return proj
