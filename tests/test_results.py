"""scripts/results.py: the search is chosen on the validation set, the test set is
decoded once with it, and the recorded command gives the same test score."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny
from transformer.cli.evaluate import eval_main
from transformer.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import results  # noqa: E402

# out of the fast lane (-m 'not slow'): toy runs swept by scripts/results.py (about 7 s)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_tokenizer):
    """Two partly trained toy copy models (different seeds, one tokenizer)."""
    paths = []
    for seed in (1, 2):
        run = tmp_path_factory.mktemp("res") / "run"
        cfg = tiny(
            run,
            toy_tokenizer,
            "training.max_steps=200",
            f"training.seed={seed}",
            "data.toy_valid_size=30",
        )
        Trainer(cfg).train()
        paths.append(run / "last.pt")
    return paths


def test_the_setting_with_the_best_validation_bleu_is_chosen():
    assert results.choose({(5, 0.0): 20.0, (5, 1.0): 25.0, (4, 2.0): 24.0}) == (5, 1.0)
    tie = {(5, 2.0): 25.0, (5, 1.0): 25.0, (3, 3.0): 25.0, (3, 4.0): 10.0}
    assert results.choose(tie) == (3, 3.0)  # the smaller beam, then alpha


@pytest.mark.slow
def test_rows_record_the_sweep_and_a_command_that_reproduces_test(
    runs, tmp_path, capsys
):
    out = tmp_path / "res.json"
    a, b = map(str, runs)
    argv = ["--out", str(out), "--beams", "1", "3", "--alphas", "0.0", "2.0"]
    assert results.main([*argv, "--row", f"one={a}", "--row", f"two={a},{b}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["one", "two"]
    for row in rows:
        sweep = {(v["beam"], v["alpha"]): v["bleu"] for v in row["valid_bleu"]}
        assert set(sweep) == {(1, 0.0), (3, 0.0), (3, 2.0)}  # greedy: alpha unused
        assert (row["beam"], row["alpha"]) == results.choose(sweep)
        assert (row["valid_split"], row["test_split"]) == ("val", "test")
        assert row["test"]["bleu"] > 0  # the toy models translate, if badly
        assert all(len(c["sha256"]) == 64 for c in row["checkpoints"])
        # the command behind the row's test number gives that number again
        command = shlex.split(row["command"])
        assert command[0] == "transformer-eval"
        report = tmp_path / f"{row['row']}.json"
        assert eval_main([*command[1:], "--report", str(report)]) == 0
        again = json.loads(report.read_text())
        assert again["data"] == "test"
        assert again["scores"]["bleu"] == pytest.approx(row["test"]["bleu"])
    assert len(rows[1]["checkpoints"]) == 2
    assert "| one |" in capsys.readouterr().out


def test_a_bad_row_is_refused_naming_it(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.json")]
    assert results.main([*out, "--row", "nothing"]) == 2
    assert "expected NAME=CHECKPOINT" in capsys.readouterr().err
    assert results.main([*out, "--row", f"r={tmp_path / 'missing.pt'}"]) == 2
    assert "no such checkpoint: " in capsys.readouterr().err


def test_a_name_given_twice_names_candidates_chosen_on_validation(
    runs, tmp_path, capsys
):
    out = tmp_path / "res.json"
    a, b = map(str, runs)
    argv = ["--out", str(out), "--beams", "1", "2", "--alphas", "1.0"]
    rows = ["--row", f"pick={a}", "--row", f"pick={b}", "--row", f"pick={a},{b}"]
    assert results.main([*argv, *rows]) == 0
    [row] = json.loads(out.read_text())["rows"]
    candidates = row["candidates"]
    assert [c["checkpoints"] for c in candidates] == [[a], [b], [a, b]]
    tops = [max(v["bleu"] for v in c["valid_bleu"]) for c in candidates]
    chosen = candidates[tops.index(max(tops))]
    assert [c["file"] for c in row["checkpoints"]] == chosen["checkpoints"]
    assert row["valid_bleu"] == chosen["valid_bleu"]
    assert row["valid_bleu_chosen"] == max(tops)
    printed = capsys.readouterr().out
    assert printed.count(": test beam") == 1  # the test split decoded once
    assert printed.count(": val beam") == 6  # 3 candidates x (greedy, beam 2)
    assert results.main([*argv, "--row", f"p={a}", "--row", f"p={a}"]) == 2
    assert "the same checkpoints twice" in capsys.readouterr().err


def test_a_row_sweeps_its_own_beams_and_may_be_marked_unpublished(
    runs, tmp_path, capsys
):
    out = tmp_path / "res.json"
    a, b = map(str, runs)
    argv = ["--out", str(out), "--beams", "1", "2", "--alphas", "1.0", "2.0"]
    argv += ["--row", f"greedy={a}", "--row", f"beam={b}", "--row-beams", "greedy=1"]
    assert results.main([*argv, "--not-published", "beam"]) == 0
    greedy, beam = json.loads(out.read_text())["rows"]
    assert [(v["beam"], v["alpha"]) for v in greedy["valid_bleu"]] == [(1, 1.0)]
    assert (greedy["beam"], greedy.get("published", True)) == (1, True)
    assert len(beam["valid_bleu"]) == 3 and beam["published"] is False
    for bad in ("greedy=0", "greedy=x", "=1", "nobody=1"):
        assert results.main([*argv, "--row-beams", bad]) == 2
        assert "--row-beams" in capsys.readouterr().err
