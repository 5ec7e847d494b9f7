"""The command-line tools on a toy checkpoint: translate, eval and average."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import transformer.precision
from tests.conftest import translate_cli
from transformer.cli.evaluate import eval_main
from transformer.cli.train import average_main, train_main
from transformer.cli.translate import translate_main
from transformer.config import load_config
from transformer.inference import load_model, set_precision, translate
from transformer.training import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A copy-task model trained for a couple of hundred steps of small batches on
    sentences of up to 8 letters: enough to copy them exactly (validation BLEU
    above 90), with two step checkpoints to average."""
    run = tmp_path_factory.mktemp("toy") / "run"
    cfg = load_config(
        ROOT / "configs" / "toy_copy.yaml",
        [
            f"training.run_dir={run}",
            f"data.cache_dir={run.parent / 'cache'}",
            "data.toy_max_len=8",
            "data.max_tokens=1024",
            "training.warmup_steps=50",
            "training.max_steps=200",
            "training.validate_every=200",
            "training.save_every=100",
            "training.best_metric=bleu",
            "training.threads=1",
        ],
    )
    train(cfg)
    return run


@pytest.mark.slow
def test_stdin_is_streamed_in_order_with_empty_lines(toy_run):
    lines = ["a b c", "", "d e f g", "h i j k l", "", "m n o"]
    result = translate_cli(
        ["--checkpoint", str(toy_run / "best.pt"), "--batch-lines", "2"],
        ("\n".join(lines) + "\n").encode(),
    )
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode().split("\n")[:-1]
    assert len(out) == len(lines)
    for src, hyp in zip(lines, out, strict=True):
        if not src:
            assert hyp == ""
        else:
            assert hyp.split() == src.split()


@pytest.mark.slow
def test_sentences_nbest_and_sampling(toy_run, capsys):
    ckpt = str(toy_run / "best.pt")
    assert (
        translate_main(
            ["--checkpoint", ckpt, "-s", "a b c", "--beam", "4", "--nbest", "3"]
        )
        == 0
    )
    rows = capsys.readouterr().out.strip().split("\n")
    assert len(rows) == 3
    scores = [float(r.split("\t")[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0].split("\t")[2] == "a b c"
    for _ in range(2):
        assert (
            translate_main(
                [
                    "--checkpoint",
                    ckpt,
                    "-s",
                    "a b c d",
                    "--sample",
                    "--top-p",
                    "0.9",
                    "--seed",
                    "3",
                ]
            )
            == 0
        )
    first, second = capsys.readouterr().out.strip().split("\n")
    assert first == second


@pytest.mark.slow
def test_invalid_utf8_is_reported_or_replaced(toy_run):
    data = b"a b\n\xff c\n"
    result = translate_cli(["--checkpoint", str(toy_run / "best.pt")], data)
    assert result.returncode == 2
    assert b"<stdin>:2: not valid UTF-8" in result.stderr
    assert b"Traceback" not in result.stderr
    result = translate_cli(
        ["--checkpoint", str(toy_run / "best.pt"), "--replace-invalid"], data
    )
    assert result.returncode == 0
    assert len(result.stdout.decode().splitlines()) == 2


@pytest.mark.slow
def test_input_longer_than_positions_warns(toy_run, caplog, capsys):
    long = " ".join(["a"] * 200)  # the toy model has 64 positions
    assert translate_main(["--checkpoint", str(toy_run / "best.pt"), "-s", long]) == 0
    assert "longer than the model's 63 pieces were truncated" in caplog.text
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_attention_plot(toy_run, tmp_path):
    png = tmp_path / "att.png"
    assert (
        translate_main(
            [
                "--checkpoint",
                str(toy_run / "best.pt"),
                "-s",
                "a b c d",
                "--attention",
                str(png),
                "--head",
                "1",
            ]
        )
        == 0
    )
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_eval_reproduces_validation_bleu(toy_run, tmp_path, capsys):
    rows = [json.loads(r) for r in (toy_run / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in rows if r["type"] == "valid"), key=lambda r: r["bleu"])
    report = tmp_path / "report.json"
    assert (
        eval_main(
            [
                "--checkpoint",
                str(toy_run / "best.pt"),
                "--split",
                "val",
                "--greedy",
                "--report",
                str(report),
                "--output",
                str(tmp_path / "hyp.txt"),
            ]
        )
        == 0
    )
    scores = json.loads(report.read_text())["scores"]
    assert scores["bleu"] == pytest.approx(best["bleu"], abs=1e-6)
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    # valid_hyps.txt holds the last validation: compare when that one was the best
    if best is rows[-1] or best["step"] == max(r["step"] for r in rows):
        hyps = (tmp_path / "hyp.txt").read_text().splitlines()
        assert hyps == (toy_run / "valid_hyps.txt").read_text().splitlines()


@pytest.mark.slow
def test_eval_in_bf16_matches_float32(toy_run, tmp_path, capsys, monkeypatch):
    # the bf16 path on any CPU (without native bf16 it would run float32 instead)
    monkeypatch.setattr(transformer.precision, "native_bf16", lambda device: True)
    reports = {}
    for precision in ("fp32", "bf16"):
        report = tmp_path / f"{precision}.json"
        args = ["--checkpoint", str(toy_run / "best.pt"), "--split", "val"]
        args += ["--beam", "3", "--precision", precision, "--report", str(report)]
        assert eval_main([*args, "--output", str(tmp_path / f"{precision}.txt")]) == 0
        reports[precision] = json.loads(report.read_text())
    assert reports["bf16"]["decoding"]["precision"] == "bf16"
    fp32, bf16 = (reports[p]["scores"]["bleu"] for p in ("fp32", "bf16"))
    assert fp32 > 90 and bf16 == pytest.approx(fp32, abs=1.0)
    # the cast itself: bf16 weights, float32 scores out of the search
    model, cfg, tokenizer, _ = load_model(toy_run / "best.pt")
    set_precision(model, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = translate(model, tokenizer, ["a b c d"], cfg.decoding, torch.device("cpu"))
    assert out[0][0].text.split() == ["a", "b", "c", "d"]


@pytest.mark.slow
def test_eval_on_file_pair(toy_run, tmp_path, capsys):
    (tmp_path / "src.txt").write_text("a b c\nd e f g\n")
    (tmp_path / "ref.txt").write_text("a b c\nd e f g\n")
    assert (
        eval_main(
            [
                "--checkpoint",
                str(toy_run / "best.pt"),
                "--src",
                str(tmp_path / "src.txt"),
                "--ref",
                str(tmp_path / "ref.txt"),
                "--beam",
                "3",
                "--ter",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "BLEU 100.00" in out and "TER" in out


def test_user_errors_are_one_line(tmp_path, capsys):
    assert eval_main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr_warmup: 3\n")
    assert train_main(["--config", str(bad)]) == 2
    assert "did you mean training.warmup_steps?" in capsys.readouterr().err


@pytest.mark.slow
def test_average_cli(toy_run, tmp_path, capsys):
    out = tmp_path / "avg.pt"
    assert (
        average_main(["--run-dir", str(toy_run), "--last", "2", "--output", str(out)])
        == 0
    )
    assert "averaged 2 checkpoints" in capsys.readouterr().out
    assert translate_main(["--checkpoint", str(out), "-s", "a b c"]) == 0
    # the eval report says what went into the average; its step is the latest one
    report = tmp_path / "avg.json"
    args = ["--checkpoint", str(out), "--split", "val", "--greedy"]
    assert eval_main([*args, "--report", str(report)]) == 0
    report = json.loads(report.read_text())
    steps = sorted(int(p.stem.split("_")[1]) for p in toy_run.glob("step_*.pt"))
    assert report["averaged_steps"] == steps[-2:] and report["step"] == steps[-1]


def text_corpus(tmp_path, train_src: str, train_tgt: str) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.de").write_text(train_src)
    (data / "train.en").write_text(train_tgt)
    (data / "val.de").write_text("a b c\n")
    (data / "val.en").write_text("a b c\n")
    return data


def train_on(tmp_path, data: Path, *extra) -> int:
    return train_main(
        [
            "--config",
            str(ROOT / "configs" / "toy_copy.yaml"),
            "data.format=text",
            f"data.dir={data}",
            f"training.run_dir={tmp_path / 'run'}",
            "training.max_steps=2",
            *extra,
        ]
    )


@pytest.mark.parametrize("text", ["", "\n\n  \n"], ids=["no lines", "blank lines"])
def test_empty_training_corpus_is_a_one_line_error(tmp_path, capsys, text):
    data = text_corpus(tmp_path, text, text)
    assert train_on(tmp_path, data) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{data / 'train.de'}, {data / 'train.en'}:" in err
    assert "no source text" in err and "Traceback" not in err


def test_fully_filtered_corpus_names_the_file_and_filter(tmp_path, capsys):
    long = " ".join(["a b c d e f g h i j"] * 10) + "\n"  # 100 words, > max_length
    data = text_corpus(tmp_path, long * 5, long * 5)
    assert train_on(tmp_path, data, "data.max_length=20") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(data / "train.de") in err
    assert "all 5 pairs were removed by the filters" in err
    assert "5 longer than data.max_length=20 pieces" in err


@pytest.mark.slow
def test_translate_file_keeps_one_line_per_input_line(toy_run, tmp_path):
    raw = (
        b"a b\xe2\x80\xa8c d\n"  # U+2028 LINE SEPARATOR inside a line
        b"e f\x0cg\n"  # form feed
        b"h \xff i\n"  # invalid UTF-8
        b"j\rk l\n"  # a lone carriage return
        b"\n"
        b"m\x1cn\xc2\x85o\n"  # file separator, NEL
    )
    path = tmp_path / "in.txt"
    path.write_bytes(raw)
    checkpoint = str(toy_run / "best.pt")
    result = translate_cli(["--checkpoint", checkpoint, "-i", str(path)])
    assert result.returncode == 2
    assert f"{path}:3: not valid UTF-8".encode() in result.stderr
    result = translate_cli(
        ["--checkpoint", checkpoint, "-i", str(path), "--replace-invalid"]
    )
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.count("\n") == raw.count(b"\n") == 6
    assert len(out.splitlines()) == 6  # no other line breaks in any translation
    assert out.split("\n")[4] == ""  # the empty line stays empty


@pytest.mark.slow
def test_eval_truncates_over_long_sources(toy_run, tmp_path, capsys, caplog):
    long = " ".join(["a b c d e f g h"] * 30)  # 240 words; the model has 64 positions
    (tmp_path / "src.txt").write_text(f"a b c\n{long}\n")
    (tmp_path / "ref.txt").write_text(f"a b c\n{long}\n")
    code = eval_main(
        [
            "--checkpoint",
            str(toy_run / "best.pt"),
            "--src",
            str(tmp_path / "src.txt"),
            "--ref",
            str(tmp_path / "ref.txt"),
            "--greedy",
            "--output",
            str(tmp_path / "hyp.txt"),
        ]
    )
    assert code == 0
    assert "longer than the model's 63 pieces were truncated" in caplog.text
    assert len((tmp_path / "hyp.txt").read_text().splitlines()) == 2
