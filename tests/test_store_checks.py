"""A corpus store checks itself when opened: a store cut short or changed is
rebuilt with a warning naming what was wrong (or refused in one line when it
cannot be), and the partial stores of interrupted builds are cleaned up."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import tiny
from transformer.config import DataConfig
from transformer.data import DataError, open_store
from transformer.data import store as store_module
from transformer.training import Trainer


def cfg_for(directory: Path) -> DataConfig:
    return DataConfig(dir=str(directory), cache_dir=str(directory / "cache"))


def built(corpus_dir: Path, tokenizer) -> tuple[DataConfig, Path, dict[str, bytes]]:
    cfg = cfg_for(corpus_dir)
    store = open_store(cfg, "train", tokenizer, cfg.cache_dir)
    arrays = {name: (store.path / name).read_bytes() for name in ARRAYS}
    return cfg, store.path, arrays


ARRAYS = ("src.bin", "tgt.bin", "src.len", "tgt.len")


def cut_to_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 4 * 2)  # half, a whole number of uint16 ids


def test_a_store_whose_src_bin_was_cut_to_half_is_rebuilt(
    corpus_dir, tokenizer, caplog
):
    """The issue's case: the cut store was trusted, and a data worker indexed
    past its end."""
    cfg, path, arrays = built(corpus_dir, tokenizer)
    cut_to_half(path / "src.bin")
    store = open_store(cfg, "train", tokenizer, cfg.cache_dir)
    assert store.path == path
    for name, data in arrays.items():
        assert (path / name).read_bytes() == data, name  # whole again
    assert f"corpus store {path} is damaged (src.bin: " in caplog.text
    assert "rebuilding it" in caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "file-digests.json",
        path.name,
    ]  # the damaged copy is gone


def test_a_run_over_a_cut_store_trains(tmp_path, toy_tokenizer, caplog):
    first = tiny(tmp_path / "a", toy_tokenizer, "training.max_steps=1")
    Trainer(first).train()
    (path,) = (tmp_path / "cache").glob("store-train-*")
    cut_to_half(path / "src.bin")
    cfg = tiny(tmp_path / "b", toy_tokenizer, "training.max_steps=30")
    Trainer(cfg).train()  # every batch of an epoch and more: no IndexError
    assert "is damaged (src.bin: " in caplog.text


def test_changed_bytes_are_caught_by_the_checksum(corpus_dir, tokenizer, caplog):
    cfg, path, arrays = built(corpus_dir, tokenizer)
    data = bytearray(arrays["tgt.bin"])
    data[10] ^= 0x01  # same size, one bit
    (path / "tgt.bin").write_bytes(bytes(data))
    assert store_module.CorpusStore.problems_of(path) == [
        "tgt.bin: its bytes differ from those written"
    ]
    open_store(cfg, "train", tokenizer, cfg.cache_dir)
    assert (path / "tgt.bin").read_bytes() == arrays["tgt.bin"]
    assert "tgt.bin: its bytes differ from those written" in caplog.text


def test_a_store_without_checksums_is_checked_by_size(corpus_dir, tokenizer, caplog):
    cfg, path, arrays = built(corpus_dir, tokenizer)
    meta = json.loads((path / "meta.json").read_text())
    del meta["checksums"]  # as written before checksums
    (path / "meta.json").write_text(json.dumps(meta))
    data = bytearray(arrays["src.len"])
    data[0] ^= 0x01
    (path / "src.len").write_bytes(bytes(data))
    assert store_module.CorpusStore.problems_of(path) == []  # sizes only
    (path / "src.len").write_bytes(arrays["src.len"][:-1])
    assert store_module.CorpusStore.problems_of(path) == [
        f"src.len: {len(arrays['src.len']) - 1:,} bytes where meta.json's counts "
        f"make {len(arrays['src.len']):,}"
    ]
    open_store(cfg, "train", tokenizer, cfg.cache_dir)
    assert "checksums" in json.loads((path / "meta.json").read_text())


@pytest.mark.parametrize("damage", ["no meta", "bad meta", "no array"])
def test_a_store_missing_its_record_or_an_array_is_rebuilt(
    corpus_dir, tokenizer, damage
):
    cfg, path, arrays = built(corpus_dir, tokenizer)
    if damage == "no meta":
        (path / "meta.json").unlink()
    elif damage == "bad meta":
        (path / "meta.json").write_text("{not json")
    else:
        (path / "tgt.len").unlink()
    assert store_module.CorpusStore.problems_of(path)
    open_store(cfg, "train", tokenizer, cfg.cache_dir)
    assert store_module.CorpusStore.problems_of(path) == []


def test_a_damaged_store_that_cannot_be_rebuilt_is_refused_in_one_line(
    corpus_dir, tokenizer, monkeypatch
):
    cfg, path, _ = built(corpus_dir, tokenizer)
    cut_to_half(path / "src.bin")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path.parent))

    monkeypatch.setattr(store_module, "set_aside", read_only)
    with pytest.raises(DataError) as e:
        open_store(cfg, "train", tokenizer, cfg.cache_dir)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"corpus store {path} is damaged (src.bin: ")
    assert f"cannot be rebuilt: {path.parent}: Read-only file system" in message


def test_partial_stores_of_interrupted_builds_are_cleaned_up(corpus_dir, tokenizer):
    from transformer.data.integrity import BUILD_LOCK
    from transformer.locks import acquire

    cache = corpus_dir / "cache"
    cache.mkdir()
    dead = cache / ".store-train-0123.dead"  # its builder was killed
    live = cache / ".store-train-0123.live"  # a build running now
    fresh = cache / ".store-train-0123.old-version-live"  # no lock, just written
    stale = cache / ".store-train-0123.old-version-dead"  # no lock, for hours
    for folder in (dead, live, fresh, stale):
        folder.mkdir()
        (folder / "src.bin").write_bytes(b"\0" * 100)
    (dead / BUILD_LOCK).write_text('{"host": "h", "pid": 1, "since": "then"}')
    building = acquire(live / BUILD_LOCK)
    hours_ago = time.time() - 3 * 3600
    for path in (stale, stale / "src.bin"):
        os.utime(path, (hours_ago, hours_ago))
    try:
        store = open_store(cfg_for(corpus_dir), "train", tokenizer, cache)
    finally:
        building.release()
    left = sorted(p.name for p in cache.iterdir() if p.name.startswith("."))
    assert left == sorted([fresh.name, live.name])
    assert store_module.CorpusStore.problems_of(store.path) == []


def test_a_write_error_while_building_is_one_line_and_leaves_nothing(
    corpus_dir, tokenizer, monkeypatch
):
    real = store_module.new_checksum

    class Full:
        def __init__(self):
            self.inner = real()

        def update(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(store_module, "new_checksum", Full)
    cfg = cfg_for(corpus_dir)
    with pytest.raises(OSError) as e:
        open_store(cfg, "train", tokenizer, cfg.cache_dir)
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename.startswith(str(corpus_dir / "cache" / "store-train-"))
    assert [p.name for p in (corpus_dir / "cache").iterdir()] == ["file-digests.json"]
