"""Plots: cross-attention for a translated sentence, training curves of a run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from transformer.config import ConfigError, DecodingConfig
from transformer.data import pad_sources
from transformer.data.languages import Direction
from transformer.files import atomic_write_bytes
from transformer.search import generate
from transformer.tokenizer import Tokenizer


def attention_png(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentence: str,
    cfg: DecodingConfig,
    device: torch.device,
    layer: int = -1,
    head: int | None = None,
    way: Direction | None = None,
) -> bytes:
    """Translate ``sentence`` and draw source pieces x target pieces; PNG bytes;
    ``way``: the direction of a multilingual model (its tag is drawn too).

    Draws on a ``Figure`` of its own rather than through pyplot's global state, so
    that a server's decoding thread can call it.
    """
    from matplotlib.figure import Figure

    if model.cfg.arch == "rnn" and model.cfg.attention == "none":
        raise ValueError("model.attention: none has no attention to plot")
    way = way or Direction("", "")
    limit = model.cfg.max_pieces() - len(way.prefix)
    ids = [*way.prefix, *tokenizer.encode_src([sentence])[0][:limit]]
    src = pad_sources([ids]).to(device)
    output = generate(model, src, cfg, bos=way.bos, banned=way.banned)[0][0].tokens
    # row t is the step that produced output[t] (from <bos> output[:t]); the last
    # row produced </s>
    tgt = torch.tensor([[way.bos, *output]], device=device)
    weights = model.alignment(src, tgt, layer).float().cpu()  # (H, T + 1, S)
    if head is not None and not 0 <= head < weights.size(0):
        raise ValueError(f"head must be in [0, {weights.size(0) - 1}]")
    matrix = weights.mean(0) if head is None else weights[head]
    tags = [tokenizer.src.id_to_piece(i) for i in way.prefix]
    src_labels = tags + tokenizer.src_pieces(sentence)[:limit] + ["</s>"]
    tgt_labels = tokenizer.tgt_pieces(output) + ["</s>"]
    width = max(4.0, 1 + 0.45 * len(src_labels))  # room for the title
    fig = Figure(figsize=(width, 1 + 0.4 * len(tgt_labels)))
    ax = fig.subplots()
    ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=60, ha="right")
    ax.set_yticks(range(len(tgt_labels)), tgt_labels)
    which = "mean over heads" if head is None else f"head {head}"
    if model.cfg.arch == "rnn":
        title = f"{model.cfg.attention} attention"
    else:
        kind = "cross-" if model.cfg.arch == "transformer" else "source "
        title = f"{kind}attention, layer {layer}, {which}"
    ax.set_title(title)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    return out.getvalue()


def plot_attention(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentence: str,
    cfg: DecodingConfig,
    device: torch.device,
    path: str | Path,
    layer: int = -1,
    head: int | None = None,
    way: Direction | None = None,
) -> Path:
    """Translate ``sentence`` and write its cross-attention heat map to a PNG file."""
    try:
        png = attention_png(model, tokenizer, sentence, cfg, device, layer, head, way)
    except ValueError as e:  # the command line names its options
        option = str(e).startswith(("layer ", "head "))
        raise ConfigError(f"--{e}" if option else str(e)) from None
    path = Path(path)
    atomic_write_bytes(path, png)
    return path


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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
    return out
