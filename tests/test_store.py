"""The corpus store and the token batches over it: round trip, filters, rebuilds,
packing, order, resume, ranks, workers, weighted corpora, the real corpus."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SRC, TGT, needs_torchrun, tiny, torchrun, write
from transformer.cli.train import preprocess_main
from transformer.config import BOS_ID, EOS_ID, PAD_ID, DataConfig, TokenizerConfig
from transformer.data import (
    FilterStats,
    TrainBatches,
    open_store,
    pack,
    read_pairs,
    token_batches,
    tokenize_pairs,
)
from transformer.data import store as store_module
from transformer.tokenizer import Tokenizer


def cfg_for(directory, **kw) -> DataConfig:
    return DataConfig(dir=str(directory), cache_dir=str(directory / "cache"), **kw)


def store_for(directory, tokenizer, **kw):
    cfg = cfg_for(directory, **kw)
    return open_store(cfg, "train", tokenizer, cfg.cache_dir)


def test_store_round_trips_every_pair(corpus_dir, tokenizer):
    cfg = cfg_for(corpus_dir, max_length=41)
    store = open_store(cfg, "train", tokenizer, cfg.cache_dir)
    stats = FilterStats()
    expected = tokenize_pairs(
        list(read_pairs(cfg, "train")), tokenizer, cfg, True, stats
    )
    assert 0 < len(store) == len(expected) < len(SRC)  # some pairs were filtered
    for i in range(len(store)):
        assert store.pair(i) == (expected.src[i], expected.tgt[i]), i
    assert store.filter_stats == stats
    assert store.meta["ids_dtype"] == "uint16" and store.meta["len_dtype"] == "uint8"
    tokens = store.meta["src_tokens"] + store.meta["tgt_tokens"]
    size = sum(f.stat().st_size for f in store.path.glob("*.*") if f.suffix != ".json")
    assert size == 2 * tokens + 2 * len(store)  # uint16 ids, one uint8 length a side


def test_lengths_at_the_top_of_their_type_do_not_wrap(tmp_path, tokenizer):
    long = " ".join(["das"] * 63 + ["nummer"])
    assert len(tokenizer.encode_src([long])[0]) == 255  # the largest uint8 length
    write(tmp_path / "train.de", [long, "das ist"])
    write(tmp_path / "train.en", [long, "this is"])
    store = store_for(tmp_path, tokenizer, max_length=255, max_length_ratio=1000.0)
    assert store.meta["len_dtype"] == "uint8" and store.lengths("src")[0] == 255
    data = train_batches([store], max_tokens=10_000)
    assert data.src_len[0] == 256  # with <eos>
    batch = data.collate(np.array([0, 1]))
    assert batch.src.size(1) == 256 and batch.src[0, 255] == EOS_ID


def test_filter_counts(tmp_path, tokenizer, caplog):
    src = ["ein satz", "   ", "kurz", "lang " * 60, "gut so"]
    tgt = [
        "a sentence",
        "empty source",
        "this is much much much much longer",
        "x",
        "ok",
    ]
    write(tmp_path / "train.de", src)
    write(tmp_path / "train.en", tgt)
    with caplog.at_level("INFO"):
        store = store_for(tmp_path, tokenizer, max_length=40, max_length_ratio=3.0)
    assert len(store) == 2
    assert store.filter_stats == FilterStats(kept=2, empty=1, too_long=1, bad_ratio=1)
    assert "kept 2 pairs, dropped 3 (empty 1, over max_length 1, length ratio 1)" in (
        caplog.text
    )


def test_store_is_reused_and_rebuilt_when_its_inputs_change(
    corpus_dir, tokenizer, monkeypatch
):
    first = store_for(corpus_dir, tokenizer)

    def no_building(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(store_module, "build_store", no_building)
    assert store_for(corpus_dir, tokenizer).path == first.path
    other_tokenizer = Tokenizer.train(
        TokenizerConfig(vocab_size=120, model_type="bpe"), SRC, TGT
    )
    assert other_tokenizer.hash() != tokenizer.hash()
    for change in (
        lambda: store_for(corpus_dir, tokenizer, max_length=50),
        lambda: store_for(corpus_dir, tokenizer, max_length_ratio=2.0),
        lambda: store_for(corpus_dir, other_tokenizer),
        lambda: (
            write(corpus_dir / "train.de", SRC[::-1]),
            store_for(corpus_dir, tokenizer),
        ),
    ):
        with pytest.raises(AssertionError, match="rebuilt"):
            change()


def test_a_touched_copied_or_moved_corpus_keeps_its_store(
    corpus_dir, tokenizer, tmp_path_factory, monkeypatch
):
    first = store_for(corpus_dir, tokenizer)
    monkeypatch.setattr(
        store_module, "build_store", lambda *a, **k: pytest.fail("rebuilt")
    )
    for name in ("train.de", "train.en.gz"):  # a fresh checkout: new times
        os.utime(corpus_dir / name, ns=(1, 1_000_000_000))
    assert store_for(corpus_dir, tokenizer).path == first.path
    elsewhere = tmp_path_factory.mktemp("moved")
    for name in ("train.de", "train.en.gz"):
        shutil.copy(corpus_dir / name, elsewhere / name)
    cfg = DataConfig(dir=str(elsewhere), cache_dir=str(corpus_dir / "cache"))
    assert open_store(cfg, "train", tokenizer, cfg.cache_dir).path == first.path


def test_file_digests_are_remembered_by_path_size_and_time(
    tmp_path, monkeypatch, caplog
):
    corpus = tmp_path / "a.txt"
    corpus.write_text("eins\nzwei\n")
    cache = tmp_path / "cache"
    (digest,) = store_module.file_digests([corpus], cache)
    assert digest == hashlib.sha256(b"eins\nzwei\n").hexdigest()
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert store_module.file_digests([corpus], cache) == [digest]
    assert corpus not in opened  # answered from the cache, not re-read
    stamp = corpus.stat().st_mtime_ns
    corpus.write_text("drei\nvier\n")  # same size, even the old time put back
    os.utime(corpus, ns=(stamp, stamp))  # (cp -p, rsync -t): hashed again
    new = hashlib.sha256(b"drei\nvier\n").hexdigest()
    assert store_module.file_digests([corpus], cache) == [new]
    assert corpus in opened
    index = cache / store_module.DIGESTS
    for damaged in ("{not json", "[1]", json.dumps({str(corpus): [1, 2]})):
        index.write_text(damaged)
        assert store_module.file_digests([corpus], cache) == [new]
    table = json.loads(index.read_text())
    for bad in (None, 123, "x" * 64):  # a wrong entry is never taken as a digest
        table[str(corpus.resolve())][-1] = bad
        index.write_text(json.dumps(table))
        assert store_module.file_digests([corpus], cache) == [new]
    # a cache folder that cannot be written: hashed, and said once per start
    assert store_module.file_digests([corpus], corpus / "cache") == [new]
    assert "cannot remember corpus digests" in caplog.text


def test_reading_in_small_chunks_writes_the_same_store(
    corpus_dir, tokenizer, monkeypatch, tmp_path
):
    whole = store_for(corpus_dir, tokenizer)
    monkeypatch.setattr(store_module, "CHUNK", 7)  # the raw-text buffer, in pairs
    chunked = store_module.build_store(
        cfg_for(corpus_dir), "train", tokenizer, tmp_path / "chunked"
    )
    for name in ("src.bin", "tgt.bin", "src.len", "tgt.len"):
        assert (whole.path / name).read_bytes() == (chunked.path / name).read_bytes()


def reference_greedy(widths: list[int], max_tokens: int, max_sentences: int):
    """The packing rule spelled out one sentence at a time."""
    batches, current = [], []
    for i, width in enumerate(widths):
        full = max_sentences and len(current) >= max_sentences
        if current and (full or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


@pytest.mark.parametrize("max_tokens, max_sentences", [(200, 0), (64, 5), (7, 0)])
def test_vectorised_packing_equals_the_greedy_rule(max_tokens, max_sentences):
    rng = np.random.default_rng(0)
    widths = np.sort(rng.integers(1, 40, 2000))
    bounds = pack(widths, max_tokens, max_sentences)
    got = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert got == reference_greedy(widths.tolist(), max_tokens, max_sentences)


def test_token_budget_and_coverage():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = token_batches(src, tgt, max_tokens=200, seed=1)
    assert sorted(i for b in batches for i in b.tolist()) == list(range(500))
    for b in batches:
        width = max(np.maximum(src[b], tgt[b]))
        assert len(b) * width <= 200 or len(b) == 1


def train_batches(stores, **kw) -> TrainBatches:
    args = dict(max_tokens=300, seed=5)
    args.update(kw)
    weights = args.pop("weights", [1.0] * len(stores))
    return TrainBatches(stores, weights, **args)


def ids_of(batches) -> list[tuple[int, ...]]:
    return [tuple(b.tolist()) for b in batches]


def test_batch_order_is_a_function_of_seed_and_epoch(corpus_dir, tokenizer):
    store = store_for(corpus_dir, tokenizer)
    a, b = train_batches([store]), train_batches([store])
    assert ids_of(a.batches(0)) == ids_of(b.batches(0))
    assert ids_of(a.batches(0)) != ids_of(a.batches(1))
    assert ids_of(a.batches(0)) != ids_of(train_batches([store], seed=6).batches(0))


def test_resume_at_any_batch(corpus_dir, tokenizer):
    data = train_batches([store_for(corpus_dir, tokenizer)])
    full = list(data.epoch(2))
    for start in (0, 3, len(full) - 1):
        resumed = list(data.epoch(2, start=start))
        assert len(resumed) == len(full) - start
        for x, y in zip(full[start:], resumed, strict=True):
            assert torch.equal(x.src, y.src) and torch.equal(x.tgt_out, y.tgt_out)


def test_batch_layout(corpus_dir, tokenizer):
    store = store_for(corpus_dir, tokenizer)
    data = train_batches([store])
    ids = data.batches(0)[0]
    batch = data.collate(ids)
    for row, i in enumerate(ids.tolist()):
        src, tgt = store.pair(i)
        assert batch.src[row].tolist() == [*src, EOS_ID] + [PAD_ID] * (
            batch.src.size(1) - len(src) - 1
        )
        assert batch.tgt_out[row, : len(tgt) + 1].tolist() == [*tgt, EOS_ID]
        assert batch.tgt_in[row, : len(tgt) + 1].tolist() == [BOS_ID, *tgt]
        assert (batch.tgt_in[row, len(tgt) + 1 :] == PAD_ID).all()
    assert batch.n_tokens == int((batch.tgt_out != PAD_ID).sum())
    assert batch.src.numel() <= 300 and batch.tgt_out.numel() <= 300


def test_ranks_read_disjoint_batches_whose_union_is_the_epoch(corpus_dir, tokenizer):
    store = store_for(corpus_dir, tokenizer)
    one = ids_of(train_batches([store]).batches(0))
    shards = [
        ids_of(train_batches([store], rank=r, world=2).batches(0)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == len(one) // 2
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(one[: len(one) - len(one) % 2])


def test_worker_processes_give_the_same_batches_in_order(corpus_dir, tokenizer):
    store = store_for(corpus_dir, tokenizer)
    here = list(train_batches([store], workers=0).stream(1, 2, max_epochs=3))
    workers = list(train_batches([store], workers=2).stream(1, 2, max_epochs=3))
    assert [(e, k) for e, k, _ in here] == [(e, k) for e, k, _ in workers]
    assert {e for e, _, _ in here} == {1, 2}  # across an epoch boundary
    for (_, _, a), (_, _, b) in zip(here, workers, strict=True):
        assert torch.equal(a.src, b.src) and torch.equal(a.tgt_in, b.tgt_in)


def test_weighted_corpora_are_mixed_by_weight(tmp_path, tokenizer):
    small, large = tmp_path / "small", tmp_path / "large"
    for directory, n in ((small, 60), (large, 300)):
        directory.mkdir()
        write(directory / "train.de", SRC[:n])
        write(directory / "train.en", TGT[:n])
    stores = [store_for(small, tokenizer), store_for(large, tokenizer)]
    n_small, n_large = len(stores[0]), len(stores[1])
    data = train_batches(stores, weights=[4.0, 0.5], seed=3)
    # per epoch: the small corpus 4 times, a random half of the large one
    halves = []
    for epoch in range(3):
        ids = np.concatenate(list(data.batches(epoch)))
        from_small = ids < n_small
        assert from_small.sum() == 4 * n_small
        assert (~from_small).sum() == round(0.5 * n_large)
        assert len(set(ids[~from_small].tolist())) == round(0.5 * n_large)
        halves.append(frozenset(ids[~from_small].tolist()))
    assert len(set(halves)) == 3  # a different half each epoch
    # and batch by batch: over the first half of an epoch's batches, the share of
    # the small corpus is within 0.1 of its expected 4 * 60 / (4 * 60 + 150)
    batches = list(data.batches(0))
    head = np.concatenate(batches[: len(batches) // 2])
    expected = 4 * n_small / (4 * n_small + round(0.5 * n_large))
    assert abs((head < n_small).mean() - expected) < 0.1
    # collation takes each pair from its own store
    ids = data.batches(0)[0]
    batch = data.collate(ids)
    for row, i in enumerate(ids.tolist()):
        src = stores[0].pair(i)[0] if i < n_small else stores[1].pair(i - n_small)[0]
        assert batch.src[row, : len(src)].tolist() == src


def test_preprocess_builds_what_training_reuses(tmp_path, toy_tokenizer, capsys):
    run = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "toy_copy.yaml"
    overrides = [
        f"training.run_dir={run}",
        f"data.tokenizer.model={toy_tokenizer}",
        "data.toy_train_size=300",
    ]
    assert preprocess_main(["--config", str(config), *overrides]) == 0
    out = capsys.readouterr().out
    assert "300 pairs kept" in out and "bytes a token" in out
    (store,) = (run / "cache").glob("store-train-*")
    from transformer.training import Trainer

    trainer = Trainer(tiny(run, toy_tokenizer, f"data.cache_dir={run / 'cache'}"))
    assert trainer.train_data.stores[0].path == store


@pytest.mark.slow
@needs_torchrun
def test_two_ranks_map_a_preprocessed_store_without_tokenizing(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "toy_copy.yaml"
    assert (
        preprocess_main(
            [
                "--config",
                str(config),
                f"training.run_dir={run}",
                f"data.tokenizer.model={toy_tokenizer}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.toy_train_size=300",
                "data.max_tokens=256",
            ]
        )
        == 0
    )
    ranks = torchrun(
        tmp_path,
        tmp_path / "out",
        run,
        f"data.tokenizer.model={toy_tokenizer}",
        "training.max_steps=3",
        env={"FORBID_STORE_BUILD": "1"},
    )
    assert ranks[0]["step"] == ranks[1]["step"] == 3


@pytest.mark.slow
def test_multi30k_store_and_batches(multi30k_dir, tmp_path):
    cfg = DataConfig(
        src_lang="de", tgt_lang="en", dir=str(multi30k_dir), cache_dir=str(tmp_path)
    )
    pairs = list(read_pairs(cfg, "train"))
    assert len(pairs) == 29000
    tok = Tokenizer.train(
        TokenizerConfig(vocab_size=8000), [s for s, _ in pairs], [t for _, t in pairs]
    )
    store = open_store(cfg, "train", tok, tmp_path)
    assert len(store) > 28900
    tokens = store.meta["src_tokens"] + store.meta["tgt_tokens"]
    size = sum(f.stat().st_size for f in store.path.iterdir() if f.suffix != ".json")
    assert size / tokens <= 2.1
    data = TrainBatches([store], [1.0], 4096, seed=1)
    assert data.efficiency(0) >= 0.9
    batch = next(data.epoch(0))
    assert batch.src.numel() <= 4096 and batch.tgt_out.numel() <= 4096
    assert len(list(read_pairs(cfg, "test_2016_flickr"))) == 1000
    shutil.rmtree(store.path)


def test_hub_rows_are_streamed_into_the_same_store(tmp_path, tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config, split, streaming, **extra):
        calls.append(streaming)
        return (
            {"translation": {"de": s, "en": t}} for s, t in zip(SRC, TGT, strict=True)
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    hub = DataConfig(format="hub", hub_name="wmt14", hub_config="de-en")
    store = open_store(hub, "train", tokenizer, tmp_path / "cache")
    assert calls == [True]  # streamed, never the whole dataset in memory
    files = store_for(tmp_path_with(tmp_path), tokenizer)
    assert len(store) == len(files)
    for i in range(len(store)):
        assert store.pair(i) == files.pair(i)


def tmp_path_with(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    write(folder / "train.de", SRC)
    write(folder / "train.en", TGT)
    return folder


def test_the_same_corpus_listed_twice_is_named(corpus_dir, tokenizer, caplog):
    from transformer.config import Config
    from transformer.config.data import CorpusConfig
    from transformer.training.build import build_stores

    copy = corpus_dir / "copy"
    copy.mkdir()
    for name in ("train.de", "train.en.gz"):
        shutil.copy(corpus_dir / name, copy / name)
    other = corpus_dir / "other"
    other.mkdir()
    write(other / "train.de", SRC[:50])
    write(other / "train.en", TGT[:50])
    data = cfg_for(
        corpus_dir,
        train=[
            CorpusConfig(dir=str(corpus_dir)),
            CorpusConfig(dir=str(other)),
            CorpusConfig(dir=str(copy), weight=2.0),
        ],
    )
    stores = build_stores(Config(data=data), tokenizer, progress=False)
    assert stores[0].path == stores[2].path != stores[1].path
    assert f"data.train[2] ({copy}/train.de, {copy}/train.en.gz) is the same " in (
        caplog.text
    )
    assert f"as data.train[0] ({corpus_dir}/train.de, " in caplog.text
    assert "data.train[1]" not in caplog.text
