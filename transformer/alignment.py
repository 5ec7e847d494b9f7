"""Word alignments from attention, in Pharaoh format (``i-j``: source word i is
aligned to target word j, both counted from 0 over whitespace-separated words).

The weights come from the model's ``alignment(src, tgt, layer)`` (the decoding
protocol, ``models.common``): a Transformer's cross-attention of one decoder
layer, an RNN's soft or hard attention, a decoder-only model's attention from
the target positions to the source; averaged over heads. An ensemble aligns with
its first model. The output is teacher-forced once more, so alignments cost one
forward pass per sentence.

From pieces to words: the weights of a target word's pieces are averaged, a
source word takes the sum of its pieces' weights, and every target word is
aligned to the source word it attends to most (one link per target word).
Source pieces belong to words by SentencePiece's word-start mark ``▁``; target
pieces by where they fall in the output text (``<unk>`` decodes to a word of
its own), so that the target word indices are those of the text printed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

WORD_START = "\u2581"


def source_words(pieces: Sequence[str]) -> list[int]:
    """The word of each source piece (SentencePiece's surface pieces)."""
    out, word = [], -1
    for i, piece in enumerate(pieces):
        if i == 0 or piece.startswith(WORD_START):
            word += 1
        out.append(word)
    return out


def target_words(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """The word of each target piece in the text ``decode(ids)``."""
    out = []
    for end in range(1, len(ids) + 1):
        out.append(max(len(decode(list(ids[:end])).split()) - 1, 0))
    return out


def word_links(
    weights: Tensor, src_words: Sequence[int], tgt_words: Sequence[int]
) -> list[tuple[int, int]]:
    """weights (T, S) over the source positions, for each target piece; the word
    of each source position (-1: none, a tag or </s>) and of each target piece ->
    (source word, target word) links, one per target word."""
    n_src = max(src_words, default=-1) + 1
    n_tgt = max(tgt_words, default=-1) + 1
    if n_src == 0 or n_tgt == 0:
        return []
    w = weights.float()
    src_index = torch.tensor(src_words)
    real = src_index >= 0
    by_src = w.new_zeros(w.size(0), n_src)  # (T, words): summed over pieces
    by_src.index_add_(1, src_index[real], w[:, real])
    tgt_index = torch.tensor(tgt_words)
    by_word = w.new_zeros(n_tgt, n_src).index_add_(0, tgt_index, by_src)
    counts = torch.bincount(tgt_index, minlength=n_tgt).clamp(min=1)
    best = (by_word / counts[:, None]).argmax(-1)  # (target words,)
    return sorted((int(i), j) for j, i in enumerate(best.tolist()))


def pharaoh(links: Sequence[tuple[int, int]]) -> str:
    """``[(0, 0), (1, 2)]`` -> ``"0-0 1-2"``."""
    return " ".join(f"{i}-{j}" for i, j in links)


def aligning_model(model: nn.Module) -> nn.Module:
    """The model whose attention aligns: an ensemble's first."""
    members = getattr(model, "models", None)
    return members[0] if members is not None else model


def check_layer(model: nn.Module, layer: int) -> str | None:
    """Why ``model`` cannot align with attention layer ``layer``, or None."""
    model = aligning_model(model)
    cfg = model.cfg
    if cfg.arch == "rnn":
        return (
            "model.attention: none has no attention"
            if cfg.attention == "none"
            else None
        )
    n = cfg.decoder_layers
    if not -n <= layer < n:
        return f"must be in [{-n}, {n - 1}] (the model has {n} decoder layers)"
    return None


@torch.no_grad()
def align(
    model: nn.Module,
    src: Sequence[int],
    tokens: Sequence[int],
    src_words: Sequence[int],
    tgt_words: Sequence[int],
    bos: int,
    layer: int,
    device: torch.device,
) -> list[tuple[int, int]]:
    """Links between a source's words and its translation's.

    Args:
        src: the source ids as the model reads them (a tag first, maybe), no
            </s>.
        tokens: the output's ids, without <bos> and </s>.
        src_words: the word of each id of ``src`` (-1 for a tag).
        tgt_words: the word of each of ``tokens``.
        bos: the decoder's first input.
    """
    if not tokens or max(src_words, default=-1) < 0:
        return []
    from transformer.data import pad_sources

    member = aligning_model(model)
    src_t = pad_sources([list(src)]).to(device)  # (1, S + 1) with </s>
    tgt = torch.tensor([[bos, *tokens]], device=device)
    weights = member.alignment(src_t, tgt, layer).float().cpu()  # (H, T + 1, S)
    # row t was the query that produced tokens[t]; the last one produced </s>
    matrix = weights.mean(0)[: len(tokens)]
    return word_links(matrix, [*src_words, -1], tgt_words)
