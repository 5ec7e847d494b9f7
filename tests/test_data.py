"""Corpus reading and its errors, evaluation splits, and tokenizers."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SRC, TGT, write
from transformer.config import BOS_ID, EOS_ID, PAD_ID, DataConfig, TokenizerConfig
from transformer.data import (
    DataError,
    read_hub_pairs,
    read_pairs,
)
from transformer.tokenizer import Tokenizer, TokenizerError, train_sentencepiece


def cfg_for(directory, **kw) -> DataConfig:
    return DataConfig(dir=str(directory), cache_dir=str(directory / "cache"), **kw)


# --- reading and its errors ---


def test_text_pairs_plain_and_gz(corpus_dir):
    pairs = list(read_pairs(cfg_for(corpus_dir), "train"))
    assert pairs == list(zip(SRC, TGT, strict=True))


def test_mismatched_line_counts_name_both_files(corpus_dir):
    write(corpus_dir / "val.en", TGT[:19])
    with pytest.raises(DataError) as e:
        list(read_pairs(cfg_for(corpus_dir), "val"))
    message = str(e.value)
    assert "val.de has 20 lines" in message and "val.en has 19" in message


def test_invalid_utf8_names_file_and_line(corpus_dir):
    (corpus_dir / "val.de").write_bytes(
        b"gut\nauch gut\nkaputt \xff hier\n" + b"x\n" * 17
    )
    with pytest.raises(DataError, match=r"val\.de:3: not valid UTF-8 \(byte 0xff"):
        list(read_pairs(cfg_for(corpus_dir), "val"))


def test_missing_split_and_directory(corpus_dir, tmp_path):
    with pytest.raises(DataError, match=r"missing data file: expected .*test\.de"):
        list(read_pairs(cfg_for(corpus_dir), "test"))
    with pytest.raises(DataError, match="data directory not found"):
        list(read_pairs(cfg_for(tmp_path / "nowhere"), "train"))
    with pytest.raises(DataError, match=r"data\.dir: format 'text' needs a directory"):
        list(read_pairs(DataConfig(), "train"))


def test_tsv_pairs_and_bad_field_count(tmp_path):
    write(tmp_path / "train.tsv", ["ein\tone", "zwei\ttwo"])
    assert list(read_pairs(cfg_for(tmp_path, format="tsv"), "train")) == [
        ("ein", "one"),
        ("zwei", "two"),
    ]
    write(tmp_path / "val.tsv.gz", ["ein\tone", "kaputt"], gz=True)
    with pytest.raises(DataError, match=r"val\.tsv\.gz:2: expected 2 tab-separated"):
        list(read_pairs(cfg_for(tmp_path, format="tsv"), "val"))
    # a blank line is an empty pair, as in plain text (the filter drops it), and a
    # later bad line keeps its own number
    write(tmp_path / "test.tsv", ["ein\tone", "", "  ", "zwei\ttwo", "drei"])
    pairs = read_pairs(cfg_for(tmp_path, format="tsv"), "test")
    assert [next(pairs) for _ in range(4)] == [
        ("ein", "one"),
        ("", ""),
        ("", ""),
        ("zwei", "two"),
    ]
    with pytest.raises(DataError, match=r"test\.tsv:5: expected 2 tab-separated"):
        next(pairs)


def test_jsonl_pairs_fields_and_errors(tmp_path):
    rows = [
        {"translation": {"de": "ein", "en": "one"}},
        {"translation": {"de": "zwei", "en": "two"}},
    ]
    write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    cfg = cfg_for(tmp_path, format="jsonl")
    assert list(read_pairs(cfg, "train")) == [("ein", "one"), ("zwei", "two")]
    write(tmp_path / "flat.jsonl", [json.dumps({"src": "a", "tgt": "b"})])
    flat = cfg_for(tmp_path, format="jsonl", src_field="src", tgt_field="tgt")
    assert list(read_pairs(flat, "flat")) == [("a", "b")]
    write(tmp_path / "val.jsonl", [json.dumps(rows[0]), "{broken"])
    with pytest.raises(DataError, match=r"val\.jsonl:2: not valid JSON"):
        list(read_pairs(cfg, "val"))
    write(tmp_path / "test.jsonl", [json.dumps({"de": "x"})])
    with pytest.raises(DataError, match=r"test\.jsonl:1: no field 'en'"):
        list(read_pairs(cfg, "test"))


def test_hub_rows_through_datasets(monkeypatch):
    import datasets

    calls = {}

    def fake_load(name, config, split, streaming, **extra):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        calls.update(extra)
        return iter([{"translation": {"de": "hallo", "en": "hello"}}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(format="hub", hub_name="wmt14", hub_config="de-en")
    assert list(read_hub_pairs(cfg, "train")) == [("hallo", "hello")]
    assert calls == dict(name="wmt14", config="de-en", split="train", streaming=True)


def test_local_jsonl_through_datasets_builder(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rows = [
        {"translation": {"de": f"satz {i}", "en": f"sentence {i}"}} for i in range(3)
    ]
    write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    # a backup and a half-copied file beside it are not part of the corpus
    write(tmp_path / "train.jsonl.bak", [json.dumps(r) for r in rows])
    write(tmp_path / "train.jsonl.part", [json.dumps(r) for r in rows[:1]])
    cfg = DataConfig(format="hub", hub_name="json", dir=str(tmp_path))
    assert list(read_pairs(cfg, "train")) == [
        (f"satz {i}", f"sentence {i}") for i in range(3)
    ]
    with pytest.raises(DataError, match=r"val\.\*: no data file for split 'val'"):
        list(read_pairs(cfg, "val"))
    # the corpus store's key follows the local files, as for the other formats
    from transformer.data.store import store_key

    key = store_key(cfg, "train", tokenizer, 0)
    write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows[:2]])
    assert store_key(cfg, "train", tokenizer, 0) != key


def test_synthetic_tasks_are_deterministic():
    copy = DataConfig(format="copy", toy_train_size=50)
    reverse = DataConfig(format="reverse", toy_train_size=50)
    a = list(read_pairs(copy, "train", seed=3))
    assert a == list(read_pairs(copy, "train", seed=3))
    assert all(s == t for s, t in a)
    assert all(s.split()[::-1] == t.split() for s, t in read_pairs(reverse, "train", 3))


# --- tokenization ---


def test_tokenizer_round_trip_and_special_ids(tokenizer):
    sentence = "das ist satz nummer 7 mit vielen wörtern"
    ids = tokenizer.encode_src([sentence])[0]
    assert min(ids) > EOS_ID
    assert tokenizer.decode_tgt(tokenizer.encode_tgt([TGT[5]])[0]) == TGT[5]
    assert tokenizer.src.decode(ids) == sentence
    assert (tokenizer.src.pad_id(), tokenizer.src.unk_id()) == (0, 1)
    assert (tokenizer.src.bos_id(), tokenizer.src.eos_id()) == (2, 3)
    # decoding stops at <eos> and drops <bos>/<pad>
    ids = tokenizer.encode_tgt(["this is"])[0]
    assert tokenizer.decode_tgt([BOS_ID, *ids, EOS_ID, 50, PAD_ID]) == "this is"


def test_tokenizer_state_and_files_round_trip(tokenizer, tmp_path):
    again = Tokenizer.from_state_dict(tokenizer.state_dict())
    assert again.encode_src(SRC[:3]) == tokenizer.encode_src(SRC[:3])
    (path,) = tokenizer.save(tmp_path)
    loaded = Tokenizer.from_files(TokenizerConfig(model=str(path)))
    assert loaded.hash() == tokenizer.hash()


def test_separate_tokenizers():
    cfg = TokenizerConfig(joint=False, vocab_size=100)
    tok = Tokenizer.train(cfg, SRC, TGT)
    assert not tok.joint
    assert tok.tgt.decode(tok.encode_tgt([TGT[1]])[0]) == TGT[1]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="nothing.model: cannot read"):
        Tokenizer.from_files(TokenizerConfig(model=str(tmp_path / "nothing.model")))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.from_files(TokenizerConfig(model=str(junk)))
    import io

    import sentencepiece as spm

    other = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SRC), model_writer=other, vocab_size=40, minloglevel=2
    )  # default ids
    with pytest.raises(TokenizerError, match="pad=0 unk=1 bos=2 eos=3"):
        Tokenizer(other.getvalue())


def test_train_sentencepiece_small_corpus_gets_fewer_pieces():
    proto = train_sentencepiece(
        ["a b c", "c b a"] * 10, TokenizerConfig(vocab_size=500)
    )
    assert Tokenizer(proto).src_vocab_size < 500
