"""Scoring given translations: the search's own scores, the training loss,
ensembles, and transformer-score (formats, inputs, resuming)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, train_copy_model
from transformer.config import EOS_ID, DecodingConfig
from transformer.data import collate
from transformer.inference import Translator
from transformer.models import Ensemble
from transformer.scoring import score_pairs
from transformer.search import decode_corpus
from transformer.training.loss import forward_loss

CPU = torch.device("cpu")
SRCS = [[5, 6, 7, 8], [9, 10, 11], [4, 12, 13, 5, 6, 7], [8]]
MODEL = ROOT / "models" / "multi30k_de_en_tiny_b.safetensors"
OTHER = ROOT / "models" / "multi30k_de_en_tiny_a.safetensors"
ARCHS = [
    {"arch": "transformer"},
    {"arch": "decoder_only"},
    {"arch": "rnn", "attention": "soft"},
    {"arch": "rnn", "attention": "hard"},
]


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: "-".join(a.values()))
def model(request):
    return train_copy_model(10, **request.param)  # outputs that vary


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_the_score_of_an_output_is_the_score_the_search_gave_it(model, strategy):
    other = train_copy_model(40, seed=1)
    cfg = DecodingConfig(strategy=strategy, beam_size=4, nbest=1, length_penalty=0.0)
    for m in (model, Ensemble([model, other]).eval()):
        results = decode_corpus(m, SRCS, cfg, CPU)
        outputs = [hyps[0].tokens for hyps in results]
        scored = score_pairs(m, SRCS, outputs, CPU, max_tokens=12)  # several batches
        for hyps, s in zip(results, scored, strict=True):
            assert s.error is None and s.pieces == len(hyps[0].tokens) + 1
            assert s.total == pytest.approx(hyps[0].score, abs=1e-4)


@pytest.mark.slow
def test_the_score_is_minus_the_training_loss_and_ensembles_of_one_agree(model):
    targets = [[5, 6, 7], [9, 10, 11, 12], [4], [8, 8, 8, 8, 8]]
    scored = score_pairs(model, SRCS, targets, CPU, 4096, per_token=True)
    batch = collate(SRCS, targets)  # as training batches them
    with torch.no_grad():
        loss = forward_loss(
            model, batch.src, batch.tgt_in, batch.tgt_out, CPU, "fp32", 0.0, 4096
        )
    assert sum(s.total for s in scored) == pytest.approx(-float(loss), abs=1e-3)
    for s, t in zip(scored, targets, strict=True):
        assert len(s.tokens) == len(t) + 1 == s.pieces
        assert sum(s.tokens) == pytest.approx(s.total, abs=1e-5)
        assert s.average == pytest.approx(s.total / s.pieces)
    alone = score_pairs(Ensemble([model]).eval(), SRCS, targets, CPU, 4096)
    for a, b in zip(alone, scored, strict=True):
        assert a.total == pytest.approx(b.total, abs=1e-6)


def test_a_target_longer_than_the_positions_is_not_scored():
    model = train_copy_model(0, max_positions=10)
    scored = score_pairs(model, [[5, 6], [5]], [[4] * 12, [7, 8]], CPU, 4096)
    assert "exceed the 10 target positions" in scored[0].error
    assert scored[1].error is None and scored[1].pieces == 3
    assert EOS_ID == 3  # the scored </s> is the model's <eos>


# --- transformer-score -----------------------------------------------------------


def score_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "score.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


DE = [
    "Ein Hund rennt durch den Schnee.",
    "Zwei Männer spielen Fußball.",
    "Eine Frau liest ein Buch.",
    "Ein Kind lacht.",
    "Ein Mann fährt Fahrrad.",
]
EN = [
    "A dog runs through the snow.",
    "Two men play soccer.",
    "A woman reads a book.",
    "A child laughs.",
    "A man rides a bike.",
]


@pytest.fixture
def pairs(tmp_path):
    (tmp_path / "s.de").write_text("\n".join(DE) + "\n")
    (tmp_path / "s.en").write_text("\n".join(EN) + "\n")
    return tmp_path / "s.de", tmp_path / "s.en"


@pytest.mark.slow
def test_transformer_score_equals_the_search_and_its_formats_agree(pairs, tmp_path):
    src, tgt = pairs
    translator = Translator.load([MODEL], "cpu")
    dcfg = translator.decoding({"beam_size": 4, "length_penalty": 0.0})
    outputs = [o[0] for o in translator.translate(DE, dcfg)]
    (tmp_path / "hyp.en").write_text("\n".join(h.text for h in outputs) + "\n")
    rows = score_cli("--checkpoint", MODEL, "--src", src, "--tgt", tmp_path / "hyp.en")
    lines = rows.stdout.splitlines()
    assert len(lines) == len(DE)
    for line, hyp in zip(lines, outputs, strict=True):
        total, pieces, average = line.split("\t")
        assert float(total) == pytest.approx(hyp.score, abs=1e-3)
        assert int(pieces) == len(hyp.tokens) + 1
        assert float(average) == pytest.approx(float(total) / int(pieces), abs=1e-5)
    # JSON lines in, JSON out, per token, an ensemble of one model twice
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"src": s, "tgt": t}) + "\n" for s, t in zip(DE, EN, strict=True)
        )
    )
    plain = score_cli("--checkpoint", MODEL, "--src", src, "--tgt", tgt, "--per-token")
    both = score_cli(
        "--checkpoint", MODEL, MODEL, "--jsonl", jsonl, "--json", "--per-token"
    )
    rows = zip(plain.stdout.splitlines(), both.stdout.splitlines(), strict=True)
    for line, row in rows:
        total, _, _, tokens = line.split("\t")
        got = json.loads(row)
        assert got["score"] == pytest.approx(float(total), abs=1e-4)
        assert sum(got["tokens"]) == pytest.approx(got["score"], abs=1e-4)
        assert [float(t) for t in tokens.split()] == pytest.approx(
            got["tokens"], abs=1e-4
        )


@pytest.mark.slow
def test_a_long_file_is_written_in_chunks_and_a_rerun_continues(pairs, tmp_path):
    src, tgt = pairs
    out = tmp_path / "scores.tsv"
    common = ["--checkpoint", MODEL, "--src", src, "--tgt", tgt, "--output", out]
    score_cli(*common, "--chunk-pairs", "2")
    full = out.read_bytes()
    progress = json.loads((tmp_path / "scores.tsv.progress").read_text())
    assert progress["pairs"] == 5 and progress["complete"]
    assert "already complete" in score_cli(*common, "--chunk-pairs", "2").stdout
    # as if stopped after the first chunk, while writing the second
    lines = full.decode().splitlines(keepends=True)
    first = "".join(lines[:2]).encode()
    out.write_bytes(first + b"-1.0\t3\t-0.3")
    progress.update(pairs=2, bytes=len(first), complete=False)
    (tmp_path / "scores.tsv.progress").write_text(json.dumps(progress))
    again = score_cli(*common, "--chunk-pairs", "2")
    assert "2 pairs done, continuing" in again.stderr
    assert out.read_bytes() == full
    # other options than the progress file's: refused, nothing overwritten
    other = score_cli(*common, "--per-token", check=False)
    assert other.returncode == 2 and "written for other" in other.stderr
    assert out.read_bytes() == full


@pytest.mark.slow
def test_bad_score_options_are_one_line_errors(pairs):
    src, tgt = pairs
    for args, message in [
        (["--src", src], "--src and --tgt go together"),
        (["--src", src, "--tgt", tgt, "--split", "val"], "got --src/--tgt and --split"),
        ([], "give the pairs as --src and --tgt"),
        (["--src", src, "--tgt", tgt, "--chunk-pairs", "0"], "--chunk-pairs: must be"),
    ]:
        result = score_cli("--checkpoint", MODEL, *args, check=False)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_score_a_split_of_the_checkpoints_corpus(multi30k_dir, tmp_path):
    out = tmp_path / "val.jsonl"
    score_cli(
        "--checkpoint", MODEL, "--split", "val", "--data-dir", multi30k_dir,
        "--json", "--output", out,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1014 and all(r["score"] < 0 for r in rows)


def test_an_ensemble_scores_the_log_of_the_mean_probability(pairs):
    translator = Translator.load([MODEL, OTHER], "cpu")
    a = Translator.load([MODEL], "cpu").score(DE, EN, per_token=True)
    b = Translator.load([OTHER], "cpu").score(DE, EN, per_token=True)
    both = translator.score(DE, EN, per_token=True)
    for x, y, z in zip(a, b, both, strict=True):
        mean = torch.logsumexp(torch.tensor([x.tokens, y.tokens]), 0) - torch.log(
            torch.tensor(2.0)
        )
        assert z.tokens == pytest.approx(mean.tolist(), abs=1e-4)
