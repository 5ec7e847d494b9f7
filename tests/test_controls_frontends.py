"""Controls, alignments and scores through the front ends: transformer-translate
(plain text and --jsonl), the server, the CTranslate2 runtime."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, translate_cli
from transformer.cli.translate import translate_main
from transformer.controls import ControlError, Controls
from transformer.inference import Translator

MODEL = ROOT / "models" / "multi30k_de_en_tiny_b.safetensors"
DE = [
    "Ein Hund rennt durch den Schnee.",
    "Zwei Männer spielen Fußball.",
    "Eine Frau liest ein Buch.",
]


@pytest.fixture(scope="module")
def translator():
    return Translator.load([MODEL], "cpu")


def words(text: str) -> int:
    return len(text.split())


def check_links(alignment: str, src: str, text: str) -> None:
    links = [tuple(map(int, x.split("-"))) for x in alignment.split()]
    assert links and all(i < words(src) and j < words(text) for i, j in links)


@pytest.mark.slow
def test_jsonl_lines_in_give_one_json_object_out_each(translator):
    lines = [
        {"src": DE[0], "constraints": ["white", "fast"]},
        {"src": DE[1], "prefix": "Two boys "},
        {"src": DE[2], "forbid": ["woman", "book"]},
        {"src": DE[2], "constraints": [""]},
        {"src": DE[0], "forbid": ["dog"], "constraints": ["dog"]},
        {"src": DE[0], "prefix": " ".join(["dog"] * 40)},
        {"src": ""},
        {"text": DE[0]},
        {"src": DE[0], "extra": 1},
    ]
    stdin = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines)
    stdin += "\n\nnot json\n"
    result = translate_cli(
        ["--checkpoint", str(MODEL), "--jsonl", "--alignment", "--nbest", "2"],
        stdin.encode(),
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    out = [json.loads(x) for x in result.stdout.decode().splitlines()]
    assert len(out) == len(lines) + 2
    first, prefixed, banned = out[:3]
    assert "white" in first["text"] and "fast" in first["text"]
    assert prefixed["text"].startswith("Two boys ")
    # a phrase is banned as pieces: "book" (▁book) may still end up in "bookstore"
    assert not {"woman", "book"} & {w.strip(".,") for w in banned["text"].split()}
    for o, line in zip(out[:3], lines[:3], strict=True):
        check_links(o["alignment"], line["src"], o["text"])
        assert len(o["nbest"]) == 2 and o["nbest"][0]["text"] == o["text"]
        assert o["warnings"] == []
    assert out[3]["error"] == "constraints[0]: empty phrase"
    assert "forbid[0] 'dog' is the required constraints[0]" in out[4]["error"]
    assert out[5]["error"].startswith("prefix: ")
    assert out[6] == {"text": "", "score": 0.0, "alignment": "", "warnings": [],
                      "nbest": []}  # fmt: skip
    assert "no src key" in out[7]["error"]
    assert "unknown key 'extra'" in out[8]["error"]
    assert out[9]["text"] == "" and "not valid JSON" in out[10]["error"]
    err = result.stderr.decode()
    assert "line 4: refused: constraints[0]: empty phrase" in err
    assert "Traceback" not in err
    # the same sentence, plain text, gives the text the JSON line gave
    dcfg = translator.decoding({"nbest": 2})
    alone = translator.translate_controlled([DE[1]], dcfg, [Controls("Two boys ")])
    assert alone[0].translations[0].text == prefixed["text"]
    assert alone[0].translations[0].score == pytest.approx(prefixed["score"])


def test_unmet_constraints_are_a_warning_of_the_sentence(translator):
    dcfg = translator.decoding({"max_len_a": 0.0, "max_len_b": 3})  # 2 pieces
    c = Controls(constraints=("white", "fast", "yellow"))
    outcome = translator.translate_controlled([DE[0]], dcfg, [c])[0]
    assert outcome.error is None and outcome.translations
    assert "constraints not met within the length limit" in outcome.warnings[0]
    text = outcome.translations[0].text
    missed = [w for w in c.constraints if w not in text]
    assert missed and all(repr(w) in outcome.warnings[0] for w in missed)


@pytest.mark.slow
def test_plain_text_with_flags_and_without(translator, capsys):
    args = ["--checkpoint", str(MODEL), "-s", DE[0], "-s", DE[2]]
    plain = translate_cli(args)
    expected = [h[0].text for h in translator.translate([DE[0], DE[2]],
                translator.decoding({}))]  # fmt: skip
    assert plain.stdout.decode().splitlines() == expected
    flags = ["--prefix", "A", "--forbid", "snow", "--constraint", "red", "--alignment"]
    result = translate_cli([*args, *flags])
    assert result.returncode == 0, result.stderr.decode()
    rows = [line.split("\t") for line in result.stdout.decode().splitlines()]
    for (text, alignment), src in zip(rows, [DE[0], DE[2]], strict=True):
        assert text.startswith("A") and "red" in text and "snow" not in text
        check_links(alignment, src, text)
    for extra, message in [
        (["--greedy", "--constraint", "red"], "--constraint: needs beam search"),
        (["--forbid", " "], "--forbid: an empty phrase"),
        (["--alignment", "--alignment-layer", "9"], "--alignment-layer: must be in"),
        (["--jsonl", "--attention", "a.png"], "not with --jsonl"),
    ]:
        assert translate_main([*map(str, args), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


# --- the server ---------------------------------------------------------------


def test_the_server_takes_controls_per_sentence():
    pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
    pytest.importorskip("httpx", reason="pip install -e '.[dev]'")
    from fastapi.testclient import TestClient

    from transformer.serve import create_app, load_models

    models = load_models([MODEL], torch.device("cpu"))
    with TestClient(create_app(models)) as client:

        def post(**body):
            return client.post("/translate", json={"source": "de", "target": "en",
                                                   **body})  # fmt: skip

        q = [
            {"src": DE[0], "constraints": ["white"]},
            DE[1],
            {"src": DE[2], "prefix": "The", "forbid": ["woman"]},
        ]
        reply = post(q=q, alignment=True)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        texts = body["translatedText"]
        assert "white" in texts[0] and texts[2].startswith("The")
        assert "woman" not in texts[2]
        for alignment, src, text in zip(body["alignment"], DE, texts, strict=True):
            check_links(alignment, src, text)
        single = post(q={"src": DE[1], "prefix": "Two boys"}).json()
        assert single["translatedText"].startswith("Two boys")
        assert "alignment" not in single  # only when asked for
        for body, message in [
            ({"q": [DE[0], {"src": DE[1], "constraints": [" "]}]},
             "sentence 2: constraints[0]: empty phrase"),
            ({"q": {"src": DE[0], "constraints": ["dog"]}, "greedy": True},
             "sentence 1: constraints need beam search, not greedy"),
            ({"q": {"src": DE[0], "constrains": ["dog"]}}, "constrains"),
            ({"q": DE[0], "alignment": True, "alignment_layer": 7},
             "alignment_layer: must be in [-4, 3]"),
        ]:  # fmt: skip
            reply = post(**body)
            assert reply.status_code == 400 and message in reply.json()["error"]
        page = client.get("/").text
        assert 'id="terms"' in page and "constraints: constraints" in page


# --- the CTranslate2 runtime ----------------------------------------------------


@pytest.fixture(scope="module")
def exported(translator, tmp_path_factory):
    pytest.importorskip("ctranslate2", reason="pip install -e '.[export]'")
    from transformer.export import ExportedModel, export_model

    out = tmp_path_factory.mktemp("ct2") / "model"
    export_model(translator.model, translator.tokenizer, out)
    return ExportedModel(out, intra_threads=1)


def test_ctranslate2_prefixes_forbidden_phrases_scores_and_alignments(
    translator, exported
):
    controls = [
        Controls(prefix="A brown"),
        Controls(forbid=("men",)),
        Controls(prefix="The lady", forbid=("book",)),
    ]
    for beam in (1, 4):
        dcfg = translator.decoding({"beam_size": beam})
        ours = translator.translate_controlled(DE, dcfg, controls, alignment=-1)
        theirs = exported.translate(DE, dcfg, controls=controls, alignment=True)
        for o, t, c in zip(ours, theirs, controls, strict=True):
            mine = o.translations[0]
            assert t[0].text.startswith(c.prefix)
            assert not any(f in t[0].text.split() for f in c.forbid)
            if beam == 1:
                assert t[0].text == mine.text
                assert t[0].alignment == mine.alignment
            if not c.forbid:  # CTranslate2 renormalises after a ban
                assert t[0].score == pytest.approx(mine.score, abs=1e-3)
    targets = ["A dog runs.", "Two men play soccer.", "A woman reads."]
    theirs, ours = exported.score(DE, targets), translator.score(DE, targets)
    for a, b in zip(theirs, ours, strict=True):
        assert a.total == pytest.approx(b.total, abs=1e-3) and a.pieces == b.pieces
    with pytest.raises(ControlError, match="sentence 2: constraints: not supported"):
        exported.translate(DE[:2], dcfg, controls=[None, Controls(constraints=("x",))])
    with pytest.raises(ControlError, match="sentence 1: prefix: one that ends"):
        exported.translate(DE[:1], dcfg, controls=[Controls(prefix="A ")])
