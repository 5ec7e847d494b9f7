"""Cross-attention plots for a translated sentence."""

from __future__ import annotations

from pathlib import Path

import torch

from transformer.config import BOS_ID, EOS_ID, DecodingConfig
from transformer.data import pad_sources
from transformer.model import Transformer
from transformer.search import generate
from transformer.tokenizer import Tokenizer


@torch.no_grad()
def cross_attention(
    model: Transformer, src: torch.Tensor, output: list[int], layer: int
) -> torch.Tensor:
    """Teacher-force ``output`` and return one layer's cross-attention (H, T, S)."""
    tgt = torch.tensor([[BOS_ID, *output]], device=src.device)
    model.record_attention(True)
    try:
        model(src, tgt)
        weights = model.decoder[layer].cross_attn.weights  # (1, H, T, S)
    finally:
        model.record_attention(False)
    return weights[0].float().cpu()


def plot_attention(
    model: Transformer,
    tokenizer: Tokenizer,
    sentence: str,
    cfg: DecodingConfig,
    device: torch.device,
    path: str | Path,
    layer: int = -1,
    head: int | None = None,
) -> Path:
    """Translate ``sentence`` and draw source pieces x target pieces as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = len(model.decoder)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"--layer must be in [{-n_layers}, {n_layers - 1}]")
    if head is not None and not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"--head must be in [0, {model.cfg.n_heads - 1}]")
    ids = tokenizer.encode_src([sentence])[0][: model.cfg.max_positions - 1]
    src = pad_sources([ids]).to(device)
    output = generate(model, src, cfg)[0][0].tokens + [EOS_ID]
    weights = cross_attention(model, src, output, layer)  # (H, T, S)
    matrix = weights.mean(0) if head is None else weights[head]
    src_labels = tokenizer.src_pieces(sentence)[: len(ids)] + ["</s>"]
    tgt_labels = tokenizer.tgt_pieces(output[:-1]) + ["</s>"]
    fig, ax = plt.subplots(
        figsize=(1 + 0.45 * len(src_labels), 1 + 0.4 * len(tgt_labels))
    )
    ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=60, ha="right")
    ax.set_yticks(range(len(tgt_labels)), tgt_labels)
    which = "mean over heads" if head is None else f"head {head}"
    ax.set_title(f"cross-attention, layer {layer % n_layers}, {which}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
