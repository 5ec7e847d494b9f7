"""transformer-translate-corpus: chunks written as they finish, a resumed job equal
to an uninterrupted one line for line (empty lines, n-best, ensembles, several
workers), a worker's failure one line, and parts of another job refused."""

from __future__ import annotations

import random

import pytest

import transformer.corpus_translation as corpus
from tests.conftest import tiny
from transformer.cli.corpus import main
from transformer.config import ConfigError
from transformer.training import Trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, toy_tokenizer) -> list[str]:
    folder = tmp_path_factory.mktemp("corpus")
    out = []
    for seed in (1, 2):  # two (barely trained) models: an ensemble too
        run = folder / f"run{seed}"
        Trainer(
            tiny(run, toy_tokenizer, "training.max_steps=4", f"training.seed={seed}")
        ).train()
        out.append(str(run / "last.pt"))
    return out


@pytest.fixture
def source(tmp_path):
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6)))
        for _ in range(23)
    ]
    lines[3] = lines[17] = ""  # empty lines give empty lines
    path = tmp_path / "src.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def translate(args, capsys) -> int:
    code = main(args)
    capsys.readouterr()
    return code


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--greedy"], ["--beam", "3", "--nbest", "2"]])
def test_an_interrupted_job_resumes_to_the_same_output(
    checkpoints, source, tmp_path, monkeypatch, capsys, extra
):
    base = ["--checkpoint", checkpoints[0], "--input", str(source), *extra]
    base += ["--chunk-lines", "5"]
    straight = tmp_path / "straight.txt"
    assert translate([*base, "--output", str(straight)], capsys) == 0
    rows = straight.read_text().splitlines()
    if "--nbest" in extra:
        assert [r.split("\t")[0] for r in rows[:4]] == ["0", "0", "1", "1"]
    else:
        assert len(rows) == 23 and rows[3] == rows[17] == ""

    cut = tmp_path / "cut.txt"
    real, calls = corpus._translate, []

    def interrupted(k, *rest):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third chunk
        calls.append(k)
        return real(k, *rest)

    monkeypatch.setattr(corpus, "_translate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        corpus.translate_corpus(
            _job(checkpoints[:1], base, extra), source, cut, progress=False
        )
    parts = sorted(p.name for p in (tmp_path / "cut.txt.parts").iterdir())
    assert parts == ["000000.txt", "000001.txt", "job.json"] and not cut.exists()
    monkeypatch.setattr(corpus, "_translate", real)
    done = []
    monkeypatch.setattr(
        corpus, "_translate", lambda k, *rest: done.append(k) or real(k, *rest)
    )
    assert translate([*base, "--output", str(cut)], capsys) == 0
    assert done == [2, 3, 4]  # the finished chunks were not redone
    assert cut.read_text() == straight.read_text()
    assert not (tmp_path / "cut.txt.parts").exists()


def _job(checkpoints, base, extra):
    import argparse

    from transformer.cli.options import add_decoding_args, search_options
    from transformer.inference import Translator

    parser = argparse.ArgumentParser()
    add_decoding_args(parser)
    args = parser.parse_args(["--checkpoint", *checkpoints, *extra])
    dcfg = Translator.load(checkpoints, "cpu").decoding(*search_options(args))
    return corpus.CorpusJob(checkpoints, dcfg, chunk_lines=5)


@pytest.mark.slow
def test_two_workers_an_ensemble_and_a_failing_chunk(
    checkpoints, source, tmp_path, monkeypatch, capsys
):
    base = ["--checkpoint", *checkpoints, "--input", str(source), "--beam", "2"]
    base += ["--chunk-lines", "4"]
    one = tmp_path / "one.txt"
    assert translate([*base, "--output", str(one)], capsys) == 0
    two = tmp_path / "two.txt"
    monkeypatch.setenv("TRANSFORMER_TEST_FAIL_CHUNK", "2")
    code = main([*base, "--workers", "2", "--output", str(two)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: chunk 2 (lines 9-12): RuntimeError: injected")
    assert not (tmp_path / "two.txt.parts" / "000002.txt").exists()
    monkeypatch.delenv("TRANSFORMER_TEST_FAIL_CHUNK")
    assert translate([*base, "--workers", "2", "--output", str(two)], capsys) == 0
    assert two.read_text() == one.read_text()


@pytest.mark.slow
def test_a_worker_that_dies_ends_the_job_in_one_line(
    checkpoints, source, tmp_path, monkeypatch, capsys
):
    """A worker lost before its first chunk (here its model load exits) is an
    error, not a pool that starts another worker for ever."""
    monkeypatch.setenv("TRANSFORMER_TEST_FAIL_LOAD", "1")
    args = ["--checkpoint", checkpoints[0], "--input", str(source), "--greedy"]
    args += ["--workers", "2", "--output", str(tmp_path / "out.txt")]
    assert main(args) == 1
    assert "error: a worker process died" in capsys.readouterr().err


def test_parts_of_another_job_are_refused(checkpoints, source, tmp_path, capsys):
    base = ["--checkpoint", checkpoints[0], "--input", str(source)]
    out = tmp_path / "out.txt"
    job = _job(checkpoints[:1], base, ["--greedy"])
    (tmp_path / "out.txt.parts").mkdir()
    import json

    record = corpus._record(job, source)
    record["decoding"]["beam_size"] = 99
    (tmp_path / "out.txt.parts" / "job.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="holds parts of another translation"):
        corpus.translate_corpus(job, source, out, progress=False)
    assert main([*base, "--greedy", "--output", str(out)]) == 2
    assert "differs in decoding" in capsys.readouterr().err
