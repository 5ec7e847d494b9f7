"""Synthetic corpora in a run: a back-translated corpus's sources start with the
reserved piece <BT> (tagged back-translation), a distilled one is read as it is,
and both mix by weight as every corpus does."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SRC, TGT, write
from transformer.config import ConfigError, load_config
from transformer.tokenizer import BT_PIECE
from transformer.training import Trainer

TOY = "configs/toy_copy.yaml"


def corpora(folder):
    (folder / "real").mkdir()
    (folder / "bt").mkdir()
    write(folder / "real" / "train.de", SRC[:200])
    write(folder / "real" / "train.en", TGT[:200])
    write(folder / "real" / "val.de", SRC[:10])
    write(folder / "real" / "val.en", TGT[:10])
    write(folder / "bt" / "train.de", SRC[100:])  # "translated back" sources
    write(folder / "bt" / "train.en", TGT[100:])
    return folder


def run_config(folder, *extra):
    return load_config(
        TOY,
        [
            "data.format=text",
            f"data.dir={folder / 'real'}",
            f"data.train=[{{dir: {folder / 'real'}}}, "
            f"{{dir: {folder / 'bt'}, synthetic: back_translated, weight: 0.5}}]",
            "data.tokenizer.vocab_size=100",
            "data.max_tokens=512",
            f"training.run_dir={folder / 'run'}",
            "training.valid_bleu=false",
            "training.best_metric=loss",
            "training.max_steps=2",
            "training.threads=1",
            *extra,
        ],
    )


def test_a_back_translated_corpus_is_tagged(tmp_path):
    folder = corpora(tmp_path)
    trainer = Trainer(run_config(folder))
    tok, data = trainer.tokenizer, trainer.train_data
    bt = tok.bt_id
    assert bt is not None and tok.tgt.id_to_piece(bt) == BT_PIECE
    assert bt not in tok.encode_src(["<BT> das ist"])[0]  # text never gives it
    real = data.collate(np.arange(0, 5))  # the first corpus: real pairs
    tagged = data.collate(data.offsets[1] + np.arange(0, 5))
    assert (tagged.src[:, 0] == bt).all() and not (real.src == bt).any()
    assert (tagged.tgt_in != bt).all()  # a source tag only
    # the tag counts in the source length the batches are packed by
    assert (data.src_len[data.offsets[1] :] == tok_lengths(tok, SRC[100:]) + 2).all()
    # mixed by weight as before: half the back-translated corpus an epoch
    ids = data.epoch_ids(0)
    assert (ids < data.offsets[1]).sum() == 200
    assert (ids >= data.offsets[1]).sum() == round(0.5 * 200)
    # and never emitted: the search bans every reserved piece
    (valid,) = trainer.valid
    assert bt in valid.way.banned
    trainer.train()


def tok_lengths(tok, texts):
    return np.array([len(ids) for ids in tok.encode_src(texts)])


def test_untagged_and_distilled_corpora_are_read_as_they_are(tmp_path):
    folder = corpora(tmp_path)
    trainer = Trainer(run_config(folder, "data.bt_tag=false"))
    assert trainer.tokenizer.bt_id is None  # nothing reserved for it
    batch = trainer.train_data.collate(trainer.train_data.offsets[1] + np.arange(3))
    assert batch.src[:, 0].tolist() == [
        ids[0] for ids in trainer.tokenizer.encode_src(SRC[100:103])
    ]


def test_a_given_tokenizer_without_the_tag_is_refused(tmp_path, toy_tokenizer):
    folder = corpora(tmp_path)
    cfg = run_config(folder, f"data.tokenizer.model={toy_tokenizer}")
    with pytest.raises(ConfigError, match="<BT>, which this tokenizer does not"):
        Trainer(cfg)
