"""Plots: cross-attention for a translated sentence, training curves of a run."""

from __future__ import annotations

import json
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


def plot_metrics(run_dir: Path) -> Path | None:
    """Training and validation loss, and validation BLEU, over steps, as a PNG."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    ]
    train = [r for r in rows if r["type"] == "train"]
    valid = [r for r in rows if r["type"] == "valid"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(
        [r["step"] for r in train], [r["loss"] for r in train], label="train (smoothed)"
    )
    if valid:
        left.plot(
            [r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid"
        )
    left.set_xlabel("step")
    left.set_ylabel("loss per token")
    left.legend()
    if valid and "bleu" in valid[0]:
        right.plot(
            [r["step"] for r in valid], [r["bleu"] for r in valid], "o-", color="C2"
        )
        right.set_ylabel("validation BLEU")
    right.set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
