"""The models published in ``models/``: the files behind the results tables of the
README and ``docs/explanation/results.md`` (``results/*.json`` names each with its
sha256), each a safetensors file (no pickle), weights only, float16, under 20 MB
with its tokenizer, and loadable and decodable like any checkpoint."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest
import sacrebleu
import torch

from transformer.checkpoint import load_checkpoint
from transformer.data.languages import direction
from transformer.inference import load_ensemble, translate
from transformer.safe_checkpoint import is_safetensors

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "models").glob("*.safetensors"))
RESULTS = sorted((ROOT / "results").glob("*.json"))
TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng", "ema", "data_signature")
# the same two sentences in each language, each side the other's reference
SENTENCES = {
    "en": ["A man in a blue shirt is riding a bike.", "Two dogs play in the snow."],
    "de": [
        "Ein Mann in einem blauen Hemd fährt Fahrrad.",
        "Zwei Hunde spielen im Schnee.",
    ],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def result_rows() -> list[dict]:
    """The reported rows of published files: a results file without rows (a
    measurement, such as the tag position's) and rows marked ``"published": false``
    (models trained only for comparison; a pivot, two decodes) are not."""
    rows = [row for f in RESULTS for row in json.loads(f.read_text()).get("rows", [])]
    return [row for row in rows if row.get("published", True)]


def test_every_result_names_a_published_file_with_its_sha256():
    rows = result_rows()
    if not rows:
        pytest.skip("no results/*.json in this checkout")
    for row in rows:
        for entry in row["checkpoints"]:
            path = ROOT / entry["file"]
            assert path.parent == ROOT / "models", f"{row['row']}: {entry['file']}"
            assert path.is_file(), f"{row['row']}: {entry['file']} is not published"
            assert sha256(path) == entry["sha256"], f"{entry['file']} has changed"


# the pages with the results tables: the README's headline and the results page
TABLES = [ROOT / "README.md", ROOT / "docs" / "explanation" / "results.md"]


@pytest.mark.parametrize("page", TABLES, ids=lambda p: p.name)
def test_the_results_tables_name_every_published_file_and_no_other(page):
    text = page.read_text(encoding="utf-8")
    named = set(re.findall(r"models/[\w.+-]+\.(?:pt|safetensors)\b", text))
    published = {f"models/{p.name}" for p in MODELS}
    assert named == published, page.relative_to(ROOT)
    others = [p.name for p in (ROOT / "models").iterdir() if p.suffix != ".safetensors"]
    assert not others, f"models/ holds more than published models: {others}"


@pytest.mark.parametrize("page", TABLES, ids=lambda p: p.name)
def test_the_results_tables_quote_each_result_as_the_json_holds_it(page):
    text = page.read_text(encoding="utf-8").replace("**", "")
    for row in result_rows():
        t = row["test"]
        cells = [t["bleu"], t["bleu_lc"], t["chrf"], row["valid_bleu_chosen"]]
        quoted = " | ".join(f"{x:.2f}" for x in cells)
        quoted += f" | {row['beam']} | {row['alpha']} |"
        where = page.relative_to(ROOT)
        assert quoted in text, f"{row['row']}: {where} does not quote {quoted}"


def decode(paths: list[Path]) -> tuple[list[str], list[str]]:
    """Greedy translations of SENTENCES by a model or an ensemble, and references
    (a multilingual model: de->en)."""
    model, cfg, tokenizer, _ = load_ensemble(paths)
    cfg.decoding.strategy = "greedy"
    way, src, tgt = None, cfg.data.src_lang, cfg.data.tgt_lang
    if cfg.data.multilingual:
        src, tgt = "de", "en"
        way = direction(cfg.data, tokenizer, src, tgt, str(paths[0]))
    out = translate(
        model, tokenizer, SENTENCES[src], cfg.decoding, torch.device("cpu"), way=way
    )
    return [hyps[0].text for hyps in out], SENTENCES[tgt]


@pytest.mark.parametrize(
    "row",
    [r for r in result_rows() if len(r["checkpoints"]) > 1],
    ids=lambda r: r["row"],
)
def test_a_reported_ensemble_loads_and_translates(row):
    texts, refs = decode([ROOT / c["file"] for c in row["checkpoints"]])
    assert sacrebleu.corpus_chrf(texts, [refs]).score > 60, texts


@pytest.mark.parametrize("path", MODELS, ids=[p.name for p in MODELS])
def test_a_published_file_is_small_half_weights_only_and_decodes(path):
    assert path.stat().st_size < 20 * 10**6
    assert is_safetensors(path) and not zipfile.is_zipfile(path)  # no pickle
    ckpt = load_checkpoint(path)
    assert ckpt.get("weights_only") is True
    assert not [k for k in TRAINING_ONLY if k in ckpt]
    dtypes = {v.dtype for v in ckpt["model"].values() if v.is_floating_point()}
    assert dtypes == {torch.float16}
    assert ckpt["tokenizer"], "the SentencePiece model travels inside"
    model = load_ensemble([path])[0]
    assert next(model.parameters()).dtype == torch.float32  # cast back to decode
    texts, refs = decode([path])
    assert sacrebleu.corpus_chrf(texts, [refs]).score > 60, texts
