"""One model, several directions: language tags, the toy multilingual task (copy
and reverse selected by the tag), sampling by temperature, validation per
direction, and every consumer (eval, translate, server, CTranslate2 export)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from transformer.config import BOS_ID, ConfigError, DecodingConfig, load_config
from transformer.controls import Controls
from transformer.data import TrainBatches
from transformer.data.languages import Direction, direction, temperature_factors
from transformer.inference import Translator
from transformer.search import generate
from transformer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy_copy.yaml"
LETTERS = "abcdefghijklmnop"


def write_corpus(folder: Path, sizes=(("train", 3000), ("val", 60))) -> Path:
    """Three 'languages' over one letter text: src, cpy (the same words) and rev
    (the words reversed); one file per split and language."""
    rng = random.Random(0)
    for split, n in sizes:
        src = [
            " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9)))
            for _ in range(n)
        ]
        rev = [" ".join(s.split()[::-1]) for s in src]
        for lang, lines in (("src", src), ("cpy", src), ("rev", rev)):
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return folder


def config(folder: Path, run: str, *extra: str):
    return load_config(
        TOY,
        [
            "data.format=text",
            f"data.dir={folder}",
            "data.pairs=[src-cpy, src-rev]",
            "data.test_split=val",
            f"training.run_dir={folder / run}",
            "training.max_steps=400",
            "training.validate_every=400",
            "training.best_metric=bleu",
            "training.threads=1",
            "data.tokenizer.vocab_size=40",
            "data.max_length=30",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("multilingual"))


@pytest.fixture(scope="module", params=["source", "target"])
def trained(request, corpus) -> Path:
    """A toy model trained on both directions, with the tag on either side; in
    float32, so that its validation decodes as ``transformer-eval`` does (bf16
    validation against float32 evaluation differed by a sentence)."""
    from transformer.training import train

    tag = f"data.tag={request.param}"
    return train(config(corpus, f"run_{request.param}", tag, "training.precision=fp32"))


# --- tags ---


def test_tags_are_reserved_single_pieces_text_cannot_produce():
    texts = ["hallo welt <2de> und <2en>", "hello world"] * 20
    tok = Tokenizer.train(_spm(), texts, [], tags=["de", "en"])
    assert tok.tags == {"de": 4, "en": 5}  # right after <pad> <unk> <s> </s>
    for text in ("<2de>", "hallo <2en> welt"):
        assert not set(tok.encode_src([text])[0]) & {4, 5}  # split like text
    assert tok.decode_tgt([4, *tok.encode_tgt(["hallo"])[0], 5]) == "hallo"
    assert Tokenizer.train(_spm(), texts, []).tags == {}  # bilingual: no tags


def _spm():
    from transformer.config import TokenizerConfig

    return TokenizerConfig(vocab_size=30)


def test_the_search_never_emits_a_tag():
    model = tiny_model(seed=0)
    project = model.project

    def tag_loving(x):  # every step prefers tags 4 and 5 by far
        logits = project(x)
        logits[..., 4:6] += 50.0
        return logits

    model.project = tag_loving
    src = torch.tensor([[7, 8, 9, 3], [10, 11, 3, 0]])
    for strategy in ("greedy", "beam", "sample"):
        cfg = DecodingConfig(strategy=strategy, beam_size=3, max_len_b=5)
        free = generate(model, src, cfg, generator=torch.Generator().manual_seed(0))
        assert any(4 in h.tokens for r in free for h in r)  # it would
        banned = generate(
            model, src, cfg, generator=torch.Generator().manual_seed(0), banned=(4, 5)
        )
        assert not any(t in (4, 5) for r in banned for h in r for t in h.tokens)


def test_directions_known_zero_shot_and_unknown():
    data = load_config(TOY, ["data.pairs=[src-cpy, src-rev]", "data.tag=source"]).data
    tok = Tokenizer.train(_spm(), ["a b c"] * 30, [], tags=["src", "cpy", "rev"])
    way = direction(data, tok, "src", "rev")
    assert way == Direction("src", "rev", (tok.tags["rev"],), BOS_ID, (4, 5, 6))
    assert direction(data, tok, "cpy", "rev").zero_shot
    with pytest.raises(ConfigError, match="does not know the language 'xx'"):
        direction(data, tok, "xx", "rev")
    with pytest.raises(ConfigError, match="say which direction"):
        direction(data, tok)
    target = load_config(TOY, ["data.pairs=[src-cpy, src-rev]", "data.tag=target"])
    assert direction(target.data, tok, "src", "cpy").bos == tok.tags["cpy"]
    bilingual = load_config(TOY).data
    with pytest.raises(ConfigError, match="translates de->en only"):
        direction(bilingual, tok, "de", "fr")


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ("[de-de]", "two different language codes"),
        ("[de-en, de-en]", "a direction is given twice"),
        ("[deen]", "each is 'src-tgt'"),
    ],
)
def test_bad_pairs_are_refused(pairs, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TOY, ["data.format=text", f"data.pairs={pairs}"])


# --- sampling by temperature ---


class _Store:
    """The parts of a corpus store the batches read: n pairs of one piece."""

    def __init__(self, n: int, key: str) -> None:
        self.n, self.key = n, key

    def __len__(self) -> int:
        return self.n

    def lengths(self, side: str) -> np.ndarray:
        return np.ones(self.n, dtype=np.uint8)


@pytest.mark.parametrize("temperature", [1.0, 5.0, 1000.0])
def test_temperature_gives_each_direction_its_share(temperature):
    sizes = [8000, 2000, 500]
    factors = temperature_factors(sizes, temperature)
    stores = [_Store(n, f"s{i}") for i, n in enumerate(sizes)]
    batches = TrainBatches(stores, factors, max_tokens=64, seed=3)
    counts = np.zeros(3)
    for epoch in range(4):
        ids = batches.epoch_ids(epoch)
        ids = np.arange(sum(sizes)) if ids is None else ids
        counts += np.bincount(
            np.searchsorted(batches.offsets, ids, "right") - 1, None, 3
        )
    expected = np.asarray(sizes, float) ** (1 / temperature)
    expected /= expected.sum()
    share = counts / counts.sum()
    # each epoch draws round(frac * n) pairs on top of the whole copies: the share
    # is exact to the rounding of a few pairs
    assert share == pytest.approx(expected, abs=2e-3)
    assert counts.sum() == pytest.approx(4 * sum(sizes), rel=1e-3)  # epoch size kept


# --- the toy task, end to end ---


@pytest.mark.slow
def test_one_model_learns_both_directions(trained, capsys):
    translator = Translator.load([trained], "cpu")
    dcfg = translator.decoding({"strategy": "greedy"})
    sentences = ["a b c d e f", "p o n m", "h e l l o"]
    copy = translator.translate(sentences, dcfg, way=translator.direction("src", "cpy"))
    rev = translator.translate(sentences, dcfg, way=translator.direction("src", "rev"))
    assert [r[0].text for r in copy] == sentences
    assert [r[0].text for r in rev] == [" ".join(s.split()[::-1]) for s in sentences]
    tags = set(translator.tokenizer.tags.values())
    assert not any(t in tags for r in copy + rev for t in r[0].tokens)


@pytest.mark.slow
def test_validation_per_direction_equals_transformer_eval(trained, capsys):
    from transformer.cli.evaluate import eval_main

    rows = [
        json.loads(line)
        for line in (trained.parent / "metrics.jsonl").read_text().splitlines()
    ]
    valid = [r for r in rows if r["type"] == "valid"][-1]
    for way in ("src-cpy", "src-rev"):
        src, tgt = way.split("-")
        report = trained.parent / f"eval.{way}.json"
        args = ["--checkpoint", str(trained), "--split", "val", "--greedy"]
        args += ["--src-lang", src, "--tgt-lang", tgt, "--report", str(report)]
        assert eval_main(args) == 0
        scores = json.loads(report.read_text())["scores"]
        assert scores["bleu"] == pytest.approx(valid[f"{way}/bleu"], abs=1e-6)
    assert valid["bleu"] == pytest.approx(
        (valid["src-cpy/bleu"] + valid["src-rev/bleu"]) / 2
    )
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(trained), "--split", "val"]) == 2
    assert "is multilingual: say which direction" in capsys.readouterr().err


@pytest.mark.slow
def test_the_server_routes_every_direction_of_one_model(trained):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from transformer.serve import create_app, load_models

    models = load_models([trained], torch.device("cpu"))
    assert {(m.source, m.target) for m in models} == {("src", "cpy"), ("src", "rev")}
    assert models[0].translator is models[1].translator  # one model in memory
    with TestClient(create_app(models)) as client:
        languages = client.get("/languages").json()
        assert languages == [{"code": "src", "name": "src", "targets": ["cpy", "rev"]}]
        ask = {"q": "a b c d", "greedy": True, "source": "src"}
        copy = client.post("/translate", json={**ask, "target": "cpy"}).json()
        rev = client.post("/translate", json={**ask, "target": "rev"}).json()
        assert (copy["translatedText"], rev["translatedText"]) == ("a b c d", "d c b a")
        zero = client.post("/translate", json={**ask, "source": "cpy", "target": "rev"})
        assert zero.status_code == 200 and "zero-shot" in zero.json()["warnings"][0]
        unknown = client.post("/translate", json={**ask, "target": "xx"})
        assert unknown.status_code == 400 and "src->xx" in unknown.json()["error"]


@pytest.mark.slow
def test_a_ctranslate2_export_decodes_both_directions_as_ours(trained, tmp_path):
    pytest.importorskip("ctranslate2")
    from transformer.export import ExportedModel, export_checkpoint

    export_checkpoint(trained, tmp_path / "ct2")
    exported = ExportedModel(tmp_path / "ct2", intra_threads=1)
    translator = Translator.load([trained], "cpu")
    sentences = (trained.parent.parent / "val.src").read_text().splitlines()[:30]
    for tgt in ("cpy", "rev"):
        for beam in (1, 4):
            ours = translator.translate(
                sentences,
                translator.decoding({"beam_size": beam}),
                way=translator.direction("src", tgt),
            )
            theirs = exported.translate(
                sentences, exported.decoding_config(beam_size=beam), "src", tgt
            )
            assert [t[0].tokens for t in theirs] == [t[0].tokens for t in ours]
        # a prefix and given translations, with the tag on either side
        way = translator.direction("src", tgt)
        prefixes = [Controls(prefix=s.split()[0]) for s in sentences[:8]]
        dcfg = translator.decoding({"beam_size": 1})
        ours = translator.translate_controlled(sentences[:8], dcfg, prefixes, way=way)
        theirs = exported.translate(sentences[:8], dcfg, "src", tgt, prefixes)
        for o, t in zip(ours, theirs, strict=True):
            assert t[0].tokens == o.translations[0].tokens
            # CTranslate2 renormalises after banning <pad>, <s> and the tags, to
            # which this toy model gives a little probability: each step's
            # log-probability can only rise (by -log(1 - banned mass)), a little
            gap = t[0].score - o.translations[0].score
            assert -1e-4 <= gap < 0.05
        given = [o.translations[0].text for o in ours]
        mine = translator.score(sentences[:8], given, way)
        theirs = exported.score(sentences[:8], given, "src", tgt)
        for a, b in zip(theirs, mine, strict=True):
            assert a.total == pytest.approx(b.total, abs=1e-3) and a.pieces == b.pieces
    with pytest.raises(ConfigError, match="is multilingual"):
        exported.translate(sentences)


# --- the stores: each language's file tokenized once ---


def test_each_language_file_is_tokenized_once(corpus, tmp_path, caplog):
    import dataclasses

    from transformer.data import open_store, read_pairs
    from transformer.data.store import build_store

    cfg = config(corpus, "run_unused", "data.pairs=[src-cpy, src-rev, cpy-src]")
    tok = Tokenizer.train(
        _spm(), [s for s, _ in read_pairs(cfg.data.direction("src", "cpy"), "train")],
        [], tags=["src", "cpy", "rev"],
    )  # fmt: skip
    cache = tmp_path / "cache"
    stores = [
        open_store(settings, split, tok, cache)
        for settings, split, _ in cfg.data.train_corpora()
    ]
    sides = sorted(p.name.split("-")[2] for p in cache.glob("side-*"))
    assert sides == ["cpy", "rev", "src"]  # three files, not six sides
    for store, (settings, split, _) in zip(
        stores, cfg.data.train_corpora(), strict=True
    ):
        assert store.meta["layout"] == "sides"
        # the same pairs, pieces and lengths as a store of the direction alone
        alone = build_store(
            dataclasses.replace(settings, pairs=[]), split, tok, tmp_path / "pairs"
        )
        assert len(store) == len(alone) == 3000
        rows = np.array([0, 5, 2999, 17])
        for side in ("src", "tgt"):
            assert (store.lengths(side) == alone.lengths(side)).all()
            assert (store.padded(side, rows, 0) == alone.padded(side, rows, 0)).all()
        shutil.rmtree(tmp_path / "pairs")
    # a damaged side is noticed through the direction's store and rebuilt
    side = next(cache.glob("side-train-rev-*"))
    data = (side / "ids.bin").read_bytes()
    (side / "ids.bin").write_bytes(data[: len(data) // 2])
    settings, split, _ = cfg.data.train_corpora()[1]
    again = open_store(settings, split, tok, cache)
    assert "damaged" in caplog.text
    assert (again.padded("tgt", np.array([0, 1]), 0) == stores[1].padded(
        "tgt", np.array([0, 1]), 0)).all()  # fmt: skip
