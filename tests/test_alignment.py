"""Word alignments from attention: the copy task aligns on the diagonal, pieces
group into the words of the texts, indices stay within the words, every
architecture and ensembles."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, train_copy_model
from transformer.alignment import (
    align,
    pharaoh,
    source_words,
    target_words,
    word_links,
)
from transformer.config import ConfigError, DecodingConfig
from transformer.data import pad_sources
from transformer.inference import Translator
from transformer.models import Ensemble
from transformer.search import generate

CPU = torch.device("cpu")
MODEL = ROOT / "models" / "multi30k_de_en_tiny_b.safetensors"
OTHER = ROOT / "models" / "multi30k_de_en_tiny_a.safetensors"
COPIES = [[5, 6, 7], [9, 10, 11, 12], [4, 8, 13, 6, 10], [12, 4, 7, 9]]


def diagonal_links(model) -> list[tuple[list, list]]:
    """(links, diagonal) for each copied source, each piece its own word."""
    out = []
    cfg = DecodingConfig(strategy="greedy")
    for src in COPIES:
        tokens = generate(model, pad_sources([src]), cfg)[0][0].tokens
        assert tokens == src  # the model copies these
        words = list(range(len(src)))
        links = align(model, src, tokens, words, words, 2, -1, CPU)
        out.append((links, [(i, i) for i in words]))
    return out


@pytest.mark.slow
def test_the_copy_model_aligns_on_the_diagonal():
    # annealed, as the other architectures' copy models: the session's copy_model
    # put one link of 16 a word off on an AVX-512 Xeon (none on an AVX2 EPYC)
    model = train_copy_model(600, anneal=True)
    on = total = 0
    for links, diagonal in diagonal_links(model):
        assert len(links) == len(diagonal)
        assert all(abs(i - j) <= 1 for i, j in links)
        on += len(set(links) & set(diagonal))
        total += len(diagonal)
    assert on >= total - 1  # 16 of 16 on both CPUs
    # an ensemble aligns with its first model
    ensemble = Ensemble([model, train_copy_model(0, seed=3)]).eval()
    src = COPIES[1]
    words = list(range(len(src)))
    assert align(ensemble, src, src, words, words, 2, -1, CPU) == list(
        zip(words, words, strict=True)
    )


@pytest.mark.slow
def test_a_decoder_only_copy_model_aligns_on_the_diagonal():
    model = train_copy_model(300, arch="decoder_only", anneal=True)
    for links, diagonal in diagonal_links(model):
        assert links == diagonal


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_an_rnn_copy_model_aligns_near_the_diagonal(attention):
    # a briefly trained RNN's attention spreads more than a Transformer's (and
    # how it spreads moves with the thread count's rounding): most links are on
    # the diagonal and nearly all within one word of it (a model that attends
    # at random puts about a third there)
    model = train_copy_model(300, arch="rnn", attention=attention, anneal=True)
    on = near = total = 0
    for links, diagonal in diagonal_links(model):
        assert len(links) == len(diagonal)
        near += sum(abs(i - j) <= 1 for i, j in links)
        on += len(set(links) & set(diagonal))
        total += len(diagonal)
    assert on >= 0.8 * total
    assert near >= 0.9 * total


def test_pieces_group_into_the_words_of_the_texts():
    assert source_words(["▁Ein", "▁Hund", "e", ",", "▁", "☃", "x", "▁ab"]) == [
        0, 1, 1, 1, 2, 2, 2, 3,
    ]  # fmt: skip
    pieces = {5: "A", 6: "dog", 7: "s", 1: " ⁇ "}  # 1: <unk> decodes as a word

    def decode(ids):
        text = ""
        for i in ids:
            text += pieces[i] if i in (7, 1) else " " + pieces[i]
        return text.strip()

    assert target_words([5, 6, 7, 1, 6], decode) == [0, 1, 1, 2, 3]
    weights = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.3, 0.5, 0.1], [0.1, 0.5, 0.3, 0.1]]
    )  # (3 target pieces, 4 source positions); the last is </s>
    # source words: positions 0 | 1 2 | </s>; target words: piece 0 | pieces 1 2
    assert word_links(weights, [0, 1, 1, -1], [0, 1, 1]) == [(0, 0), (1, 1)]
    assert word_links(weights, [0, 1, 2, -1], [0, 1, 2]) == [(0, 0), (1, 2), (2, 1)]
    assert pharaoh([(0, 0), (2, 1)]) == "0-0 2-1"
    assert word_links(weights[:0], [0], []) == []


SENTENCES = [
    "Ein Hund rennt durch den Schnee.",
    "Zwei junge Männer spielen auf einer Wiese Fußball.",
    "Eine Frau mit einem roten Hut liest ein Buch ☃ im Park.",
    "Kinder.",
]


def test_alignment_indices_stay_within_the_words():
    translator = Translator.load([MODEL], "cpu")
    dcfg = translator.decoding({"beam_size": 3, "nbest": 3})
    outcomes = translator.translate_controlled(SENTENCES, dcfg, alignment=-2)
    for sentence, outcome in zip(SENTENCES, outcomes, strict=True):
        assert len(outcome.translations) == 3
        for h in outcome.translations:
            links = [tuple(map(int, x.split("-"))) for x in h.alignment.split()]
            assert links, h
            assert all(0 <= i < len(sentence.split()) for i, _ in links)
            assert sorted(j for _, j in links) == list(range(len(h.text.split())))
    # an ensemble aligns with its first model's attention
    both = Translator.load([MODEL, OTHER], "cpu")
    alone = translator.alignments(*both_outputs(both), layer=-1)
    assert both.alignments(*both_outputs(both), layer=-1) == alone


def both_outputs(translator):
    sources, _ = translator.encode(SENTENCES)
    dcfg = translator.decoding({"beam_size": 2})
    outputs = [h[0].tokens for h in translator.decode(sources, dcfg)]
    return sources, outputs


def test_alignments_the_model_cannot_give_are_refused():
    translator = Translator.load([MODEL], "cpu")
    with pytest.raises(ConfigError, match=r"--alignment-layer: must be in \[-4, 3\]"):
        translator.check_alignment(4)
    translator.check_alignment(-4)
    none = train_copy_model(0, arch="rnn", attention="none")
    rnn = Translator(none, translator.config, translator.tokenizer, CPU, ["x.pt"])
    with pytest.raises(ConfigError, match="alignment: model.attention: none"):
        rnn.check_alignment(-1)
