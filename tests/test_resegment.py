"""Subword regularization: each pair's segmentation sampled per epoch, a pure
function of (seed, epoch, pair), the text unchanged, validation and decoding on
the best segmentation, and a resumed run bit-identical to an uninterrupted one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.conftest import tiny
from transformer.checkpoint import load_checkpoint
from transformer.config import PAD_ID
from transformer.training import Trainer

SAMPLED = ["data.tokenizer.sampling_alpha=0.2", "data.workers=0"]


def pieces(batch, rows) -> list[list[int]]:
    return [[t for t in batch.src[r].tolist() if t != PAD_ID] for r in rows]


@pytest.fixture
def trainer(tmp_path, toy_tokenizer):
    return Trainer(tiny(tmp_path / "run", toy_tokenizer, *SAMPLED))


def test_samples_are_a_function_of_seed_epoch_and_pair(trainer):
    data, tok = trainer.train_data, trainer.tokenizer
    ids = np.arange(40)
    a, b = data.collate(ids, epoch=0), data.collate(ids, epoch=0)
    assert torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out)
    # the same pair in another batch: the same sample
    other = data.collate(np.array([7, 100, 3]), epoch=0)
    assert pieces(other, [0]) == pieces(a, [7])
    # another epoch: other segmentations of the same text
    c = data.collate(ids, epoch=1)
    assert pieces(c, range(40)) != pieces(a, range(40))
    for x, y in zip(pieces(a, range(40)), pieces(c, range(40)), strict=True):
        assert tok.src.decode(x[:-1]) == tok.src.decode(y[:-1])  # minus </s>
    best = data.collate(ids)  # without an epoch: the stored, best segmentation
    stored = [trainer.train_data.stores[0].pair(i)[0] for i in range(40)]
    assert [p[:-1] for p in pieces(best, range(40))] == stored
    sampled = pieces(a, range(40))
    longer = sum(len(x) - 1 > len(y) for x, y in zip(sampled, stored, strict=True))
    assert longer > 0  # alpha 0.2 splits words the best segmentation keeps


def test_validation_uses_the_best_segmentation(trainer):
    (valid,) = trainer.valid
    texts = valid.corpus.srcs
    assert valid.corpus.src == trainer.tokenizer.encode_src(texts)


@pytest.mark.slow
def test_a_resumed_run_is_bit_identical(tmp_path, toy_tokenizer):
    def run(folder, steps, resume=None):
        cfg = tiny(
            tmp_path / folder,
            toy_tokenizer,
            *SAMPLED,
            f"training.max_steps={steps}",
            "training.validate_every=3",
        )
        trainer = Trainer(cfg, resume)
        trainer.train()
        return trainer

    straight = run("a", 8)
    run("b", 5)
    resumed = run("b", 8, resume=True)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 8
    for (name, p), q in zip(
        straight.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    # and the samples changed the run: the same run on the best segmentation differs
    plain = Trainer(tiny(tmp_path / "c", toy_tokenizer, "training.max_steps=8"))
    plain.train()
    assert not torch.equal(plain.model.tgt_embed.weight, resumed.model.tgt_embed.weight)


def test_workers_sample_as_this_process_does(tmp_path, toy_tokenizer):
    cfg = tiny(tmp_path / "w", toy_tokenizer, "data.tokenizer.sampling_alpha=0.2")
    data = Trainer(cfg).train_data  # data.workers: 1 (the toy config's default)
    assert data.workers == 1
    streamed = [batch for _, _, batch in itertools.islice(data.stream(0), 3)]
    data.workers = 0
    here = [batch for _, _, batch in itertools.islice(data.stream(0), 3)]
    for a, b in zip(streamed, here, strict=True):
        assert torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out)
