"""Bad input to the command-line tools and configs: one clear line naming the
option, file, line or key, checked before the work; never a traceback, never a
silently wrong result."""

from __future__ import annotations

import fcntl
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformer.inference
import transformer.search
import transformer.stepper
from tests.conftest import ROOT, TOY, tiny, translate_cli
from transformer.checkpoint import atomic_save, load_checkpoint
from transformer.cli.evaluate import eval_main
from transformer.cli.train import average_main, train_main
from transformer.cli.translate import translate_main
from transformer.config import EOS_ID, ConfigError, DecodingConfig, load_config
from transformer.config.loading import read_yaml
from transformer.data import read_lines
from transformer.evaluation import reference_warnings
from transformer.inference import load_model
from transformer.training import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_tokenizer) -> Path:
    """A toy run with step checkpoints (barely trained: only its files matter)."""
    run = tmp_path_factory.mktemp("bad") / "run"
    cfg = tiny(run, toy_tokenizer, "training.max_steps=20", "training.save_every=10")
    Trainer(cfg).train()
    return run


@pytest.mark.slow
def test_nbest_rows_number_the_input_lines_across_batches(run):
    lines = ["a b c", "d e", "", "f g h", " ".join(["a"] * 200), "i j"]
    args = ["--checkpoint", str(run / "last.pt"), "--beam", "2", "--nbest", "2"]
    result = translate_cli([*args, "--batch-lines", "2"], "\n".join(lines).encode())
    assert result.returncode == 0, result.stderr.decode()
    rows = [r.split("\t") for r in result.stdout.decode().splitlines()]
    # two rows a line, one (empty) for the empty line, numbered from 0 throughout
    assert [int(r[0]) for r in rows] == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5]
    assert rows[4] == ["2", "0.0000", ""]
    # the over-long line is named by its line in the input, not in its batch
    assert "truncated (first: line 5)" in result.stderr.decode()


@pytest.mark.slow
def test_a_closed_output_pipe_stops_quietly(run, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a b c\n" * 20000)  # more output than the pipe holds
    with source.open("rb") as stdin:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "translate.py")]
            + ["--checkpoint", str(run / "last.pt"), "--batch-lines", "1", "--greedy"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)  # before it writes
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does, while it still has lines to write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--greedy", "--nbest", "3"], "several hypotheses need beam search"),
        (["--sample", "--nbest", "2"], "several hypotheses need beam search"),
        (["--device", "foo"], "--device: 'foo' is not a device"),
        (["--sample", "--temperature", "inf"], "temperature: must be finite"),
        (["--unk-penalty", "inf"], "decoding.unk_penalty: must be finite"),
        (["--length-penalty", "nan"], "length_penalty: expected a number (got nan)"),
        (["--sample", "--seed", "9" * 23], "does not fit in 64 bits"),
        (["--batch-lines", "0"], "--batch-lines: must be >= 1"),
        (["-i", "in.txt"], "give sentences (-s) or an --input file, not both"),
        (["--attention", "nodir/a.png"], "--attention nodir/a.png: no such directory"),
        (["--attention", "."], "--attention .: is a directory"),
        (["--beam", "3", "--temperature", "2"], "--temperature: for sampling only"),
        (["--greedy", "--seed", "1", "--top-k", "5"], "--top-k, --seed: for sampling"),
        (["--top-p", "0.5"], "--top-p: for sampling only (add --sample)"),
        (["--beam", "2", "--nbest", "5"], "--nbest 5 is more than --beam 2"),
        (["--beam", "1", "--nbest", "3"], "need beam search (--beam 3 or more)"),
        (["--beam", "2", "--nbest", "0"], "--nbest 0: must be >= 1"),
        (["--greedy", "decoding.nbest=3"], "decoding.nbest=3: several hypotheses"),
        (["--beam", "2", "decoding.nbest=5"], "decoding.nbest=5 is more than --beam 2"),
        (
            ["decoding.strategy=beam", "decoding.beam_size=2", "--nbest", "4"],
            "--nbest 4 is more than decoding.beam_size=2",
        ),
        (["model.d_model=3"], "model.d_model: only decoding.* overrides"),
        (["decoding.max_len_b=-100"], "decoding.max_len_b: >= 1 (or 0 with"),
        (["decoding.min_len=5000"], "decoding.min_len: 5000 must be below the model"),
    ],
)
def test_translate_options_that_do_not_fit(run, capsys, options, message):
    argv = ["--checkpoint", str(run / "last.pt"), "-s", "a b", *options]
    assert translate_main(argv) == 2
    out = capsys.readouterr()
    assert message in out.err and "Traceback" not in out.err
    assert out.out == ""  # refused before any translation


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_min_len_beyond_a_sentences_limit_is_warned_about(
    run, caplog, monkeypatch, strategy
):
    monkeypatch.setattr(transformer.stepper, "_warned_min_len", False)
    model = load_model(run / "last.pt")[0]
    src = torch.tensor([[5, 6, EOS_ID]])  # a limit of floor(1.5 * 3 + 10) = 14
    cfg = DecodingConfig(strategy=strategy, beam_size=2, min_len=20, max_len_b=10)
    hyps = transformer.search.generate(model, src, cfg)
    assert "decoding.min_len=20 is beyond the length limit" in caplog.text
    # the limit wins: <eos> is banned until it, then forced (13 tokens and <eos>)
    assert all(len(h.tokens) == 13 for h in hyps[0])


def test_attention_layer_is_checked_before_the_input_is_translated(
    run, tmp_path, capsys
):
    argv = ["--checkpoint", str(run / "last.pt"), "-s", "a b", "-s", "c d"]
    plot = ["--attention", str(tmp_path / "a.png"), "--layer", "99"]
    assert translate_main([*argv, *plot]) == 2
    out = capsys.readouterr()
    assert "--layer must be in [-2, 1]" in out.err and out.out == ""


def test_undecodable_bytes_on_the_command_line(run, capsys):
    # what Python makes of `-s $'a \xff b'`: a lone surrogate
    argv = ["--checkpoint", str(run / "last.pt"), "-s", "ok", "-s", "a \udcff b"]
    assert translate_main(argv) == 2
    assert "--sentence #2: not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--greedy", "--beam", "4"], "not allowed with argument"),
        (["--greedy", "--sample"], "not allowed with argument"),
        (["decoding.beam_size"], "decoding.beam_size: expected decoding.key=value"),
    ],
)
def test_search_options_that_exclude_each_other(run, capsys, options, message):
    with pytest.raises(SystemExit) as exit:
        translate_main(["--checkpoint", str(run / "last.pt"), "-s", "a", *options])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_output_paths_are_checked_before_decoding(
    run, tmp_path, capsys, monkeypatch
):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the output paths were checked")

    monkeypatch.setattr(transformer.inference, "translate", no_decoding)
    base = ["--checkpoint", str(run / "last.pt"), "--split", "val", "--greedy"]
    for option in ("--output", "--report"):
        target = tmp_path / "nodir" / "x"
        assert eval_main([*base, option, str(target)]) == 2
        assert f"{option} {target}: no such directory" in capsys.readouterr().err
    # and a minimum length no output can have, naming the checkpoint
    assert eval_main([*base, "decoding.min_len=999"]) == 2
    err = capsys.readouterr().err
    assert "decoding.min_len: 999 must be below the model.max_positions" in err
    assert str(run / "last.pt") in err


def test_a_stored_nbest_does_not_stop_greedy_search(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / "last.pt")
    decoding = {**ckpt["config"]["decoding"], "nbest": 3, "beam_size": 4}
    ckpt["config"] = {**ckpt["config"], "decoding": decoding}
    atomic_save(ckpt, tmp_path / "nbest.pt")
    for search in (["--greedy"], ["--beam", "1"], ["--sample", "--seed", "1"]):
        argv = ["--checkpoint", str(tmp_path / "nbest.pt"), "-s", "a b", *search]
        assert translate_main(argv) == 0, search
        assert len(capsys.readouterr().out.splitlines()) == 1


def write_config(tmp_path, text: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_config_files_that_are_not_configs(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: empty config"):
        load_config(write_config(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 0xff"):
        load_config(write_config(tmp_path, b"\xff\xfedata: {}\n"))


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path):
    text = TOY.read_text() + "training:\n  seed: 5\n"  # a second training section
    first = 1 + TOY.read_text().splitlines().index("training:")
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, text))
    message = str(e.value)
    assert "duplicate key 'training'" in message
    assert f"first on line {first}" in message
    assert f"line {len(TOY.read_text().splitlines()) + 1}" in message
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_config(write_config(tmp_path, "training:\n  seed: 1\n  seed: 2\n"))
    # merge keys are not duplicates, nested ones neither
    merged = "a: &a {x: 0}\nb: &b {<<: *a, x: 1}\nc: {<<: *b, x: 3}\n"
    assert read_yaml(merged) == {"a": {"x": 0}, "b": {"x": 1}, "c": {"x": 3}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lr=.inf", "training.lr: must be finite"),
        ("training.lr=.nan", "training.lr: expected a number (got nan)"),
        ("training.seed=99999999999999999999", "does not fit in 64 bits"),
        ("training.max_stpes=3", "command line: training.max_stpes: unknown key"),
        (
            "decoding.min_len=9999",
            "decoding.min_len: must be below model.max_positions",
        ),
    ],
)
def test_bad_overrides_are_named_as_the_command_lines(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TOY, [override])
    assert message in str(e.value)
    if override.startswith("training.max_stpes"):
        assert str(TOY) not in str(e.value)  # the file is not to blame


def test_a_typo_in_the_file_is_still_the_files(tmp_path, capsys):
    path = write_config(tmp_path, TOY.read_text().replace("max_steps", "max_stpes"))
    assert train_main(["--config", str(path)]) == 2
    assert f"{path}: training.max_stpes: unknown key" in capsys.readouterr().err


def test_average_refuses_weights_that_do_not_mean_the_same(run, tmp_path, capsys):
    last = load_checkpoint(run / "last.pt")
    other_tok = dict(last, tokenizer=dict(last["tokenizer"]))
    name = next(iter(other_tok["tokenizer"]))
    other_tok["tokenizer"][name] = other_tok["tokenizer"][name].clone()
    other_tok["tokenizer"][name][-1] ^= 1
    atomic_save(other_tok, tmp_path / "tok.pt")
    model = dict(last["config"]["model"], norm_first=False)
    atomic_save(
        dict(last, config={**last["config"], "model": model}), tmp_path / "a.pt"
    )
    out = ["--output", str(tmp_path / "avg.pt")]
    cases = [
        (["--inputs", str(run / "last.pt"), str(tmp_path / "tok.pt")], "different"),
        (["--inputs", str(run / "last.pt"), str(tmp_path / "a.pt")], "norm_first"),
        (["--inputs", str(run / "last.pt"), str(run / "last.pt")], "given twice"),
        (["--run-dir", str(run), "--last", "0"], "--last: must be >= 1"),
        (["--run-dir", str(run), "--inputs", str(run / "last.pt")], "not both"),
    ]
    for argv, message in cases:
        assert average_main([*argv, *out]) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "avg.pt").exists()


def test_average_reads_only_the_step_checkpoints_it_wrote(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copy(copy / "last.pt", copy / "step_final.pt")
    argv = ["--run-dir", str(copy), "--last", "9", "--output", str(tmp_path / "a.pt")]
    assert average_main(argv) == 0
    assert "averaged 2 checkpoints" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "a.pt")["averaged_steps"] == [10, 20]


def test_damaged_weights_are_refused_naming_the_file(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / "last.pt")
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name].clone()
    ckpt["model"][name].view(-1)[:4] = torch.nan
    atomic_save(ckpt, tmp_path / "nan.pt")
    assert translate_main(["--checkpoint", str(tmp_path / "nan.pt"), "-s", "a"]) == 2
    err = capsys.readouterr().err
    assert f"nan.pt: 1 raw weight tensor(s) hold NaN or inf (first: {name})" in err


def test_a_byte_order_mark_is_not_text(tmp_path):
    for name, opener in (("r.txt", open), ("r.txt.gz", gzip.open)):
        with opener(tmp_path / name, "wb") as f:
            f.write("\ufeffEin Hund.\nZwei.\n".encode())
        assert list(read_lines(tmp_path / name)) == ["Ein Hund.", "Zwei."]


def test_empty_references_are_warned_about():
    (warning,) = reference_warnings(["A dog.", "", "Two cats.", " "])
    assert warning.startswith("2 references are empty (first: line 2)")


def test_a_flipped_byte_in_a_checkpoint_is_caught_by_its_crc(run, tmp_path, capsys):
    import struct
    import zipfile

    damaged = tmp_path / "flip.pt"
    shutil.copy(run / "last.pt", damaged)
    with zipfile.ZipFile(damaged) as archive:  # the largest record: weights
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(damaged.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01  # one bit of one float: still finite
    damaged.write_bytes(bytes(data))
    assert translate_main(["--checkpoint", str(damaged), "-s", "a"]) == 2
    err = capsys.readouterr().err
    assert f"flip.pt: damaged (Bad CRC-32 for file {info.filename!r})" in err


def test_an_unusable_run_folder_is_a_one_line_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["--config", str(TOY), f"training.run_dir={afile}/run"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {afile}/run: Not a directory" in err
    assert "Traceback" not in err


def test_written_files_get_the_umask_permissions(run, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "m.pt")
        assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_save({"x": torch.zeros(1)}, tmp_path / "p.pt")
        assert (tmp_path / "p.pt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_resuming_with_another_tokenizer_is_refused(run, tmp_path, toy_tokenizer):
    from transformer.config import DataConfig, TokenizerConfig
    from transformer.data import read_pairs
    from transformer.tokenizer import Tokenizer

    pairs = list(read_pairs(DataConfig(format="copy", toy_train_size=200), "train"))
    other = Tokenizer.train(TokenizerConfig(vocab_size=30), [s for s, _ in pairs], [])
    (other_path,) = other.save(tmp_path / "spm")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with pytest.raises(ConfigError, match="is not the tokenizer .*last.pt was trained"):
        Trainer(tiny(copy, str(other_path), "training.max_steps=30"))
    Trainer(tiny(copy, toy_tokenizer, "training.max_steps=30"))  # its own: resumes


@pytest.mark.parametrize("content", [b"", b"not a model"], ids=["empty", "text"])
def test_a_bad_tokenizer_file_is_named_with_its_key(tmp_path, content, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(content)
    argv = ["--config", str(TOY), f"data.tokenizer.model={bad}"]
    assert train_main([*argv, f"training.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"data.tokenizer.model: {bad}: " in err and "Traceback" not in err
    assert ("an empty file" in err) == (content == b"")


def test_a_missing_validation_split_fails_before_any_work(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for lang in ("de", "en"):
        (data / f"train.{lang}").write_text("a b c\nd e f\n")
    argv = ["--config", str(TOY), "data.format=text", f"data.dir={data}"]
    argv += [f"training.run_dir={tmp_path / 'run'}", "data.valid_split=nosuch"]
    assert train_main(argv) == 2
    assert "data.valid_split='nosuch': " in capsys.readouterr().err
    assert not (tmp_path / "run" / "spm.model").exists()  # no tokenizer trained


def test_a_download_file_name_cannot_leave_the_download_folder():
    config = ROOT / "configs" / "multi30k_en_de.yaml"
    for name in ("../x.de", "sub/x.de", ".."):
        override = f"data.source_files={{'{name}': '{'0' * 64}'}}"
        with pytest.raises(ConfigError, match="a file name, without a folder"):
            load_config(config, [override])


def _saved(tmp_path: Path, obj, name: str = "x.pt") -> Path:
    torch.save(obj, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: torch.tensor([1, 2]),
            "not a checkpoint of this toolkit (it holds a",
        ),
        (lambda c: 3, "not a checkpoint of this toolkit (it holds a int"),
        (lambda c: {"model": {}}, "(no config, tokenizer)"),
        (lambda c: {**c, "format": 99}, "written by a newer version of this toolkit"),
        (lambda c: {**c, "format": "x"}, "not a checkpoint format ('x')"),
        (lambda c: {**c, "config": "yaml?"}, "its 'config' entry is a str"),
        (lambda c: {**c, "config": {}}, "stored config is invalid"),
        (lambda c: {**c, "tokenizer": {}}, "its stored tokenizer: no SentencePiece"),
        (lambda c: {**c, "model": [1]}, "its 'model' entry is not a state dict"),
        (lambda c: {**c, "ema": {"a": 1}}, "its 'ema' entry is not a state dict"),
    ],
)
def test_files_that_are_not_our_checkpoints(run, tmp_path, capsys, change, message):
    path = _saved(tmp_path, change(load_checkpoint(run / "last.pt")))
    assert translate_main(["--checkpoint", str(path), "-s", "a b"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err


def test_a_truncated_checkpoint_or_a_folder_is_named_as_such(run, tmp_path, capsys):
    data = (run / "last.pt").read_bytes()
    for size in (20000, len(data) // 2, len(data) - 10):
        cut = tmp_path / f"cut{size}.pt"
        cut.write_bytes(data[:size])
        assert translate_main(["--checkpoint", str(cut), "-s", "a"]) == 2
        err = capsys.readouterr().err
        assert f"{cut}: truncated" in err or f"{cut}: damaged" in err, err
    assert translate_main(["--checkpoint", str(run), "-s", "a"]) == 2
    assert f"{run}: is a folder, not a checkpoint file; did you mean {run}/best.pt" in (
        capsys.readouterr().err
    )


def test_average_never_replaces_an_input_or_a_resumable_checkpoint(
    run, tmp_path, capsys, toy_tokenizer
):
    shutil.copytree(run, tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    for output in (last, tmp_path / "run" / "best.pt"):
        argv = ["--inputs", str(last), "--weights-only", "--output", str(output)]
        assert average_main(argv) == 2
        err = capsys.readouterr().err
        assert str(output) in err and "Traceback" not in err
    assert last.read_bytes() == before
    # written anyway (by hand, or by an older version): resuming says what it is
    assert (
        average_main(["--inputs", str(last), "--output", str(tmp_path / "w.pt")]) == 0
    )
    shutil.copy(tmp_path / "w.pt", last)
    cfg = tiny(tmp_path / "run", toy_tokenizer, "training.max_steps=20")
    with pytest.raises(Exception, match="holds weights without a training state"):
        Trainer(cfg)


def test_why_a_file_holds_no_ema_weights(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["config"]["training"]["ema_decay"] = 0.99  # as if trained with an EMA
    ckpt["ema"] = dict(ckpt["model"])
    with_ema = _saved(tmp_path, ckpt, "ema.pt")
    argv = ["--inputs", str(with_ema), "--weights-only", "--output"]
    assert average_main([*argv, str(tmp_path / "w.pt")]) == 0
    capsys.readouterr()
    for path, why in [
        (tmp_path / "w.pt", "written by transformer-average with --weights-only"),
        (run / "last.pt", "trained with training.ema_decay: 0"),
    ]:
        assert translate_main(["--checkpoint", str(path), "--weights", "ema"]) == 2
        assert why in capsys.readouterr().err


def test_an_ensemble_translates_one_direction(run, tmp_path, capsys, caplog):
    ckpt = load_checkpoint(run / "last.pt")
    data = ckpt["config"]["data"]
    ckpt["config"]["data"] = {
        **data,
        "src_lang": data["tgt_lang"],
        "tgt_lang": data["src_lang"],
    }
    other = _saved(tmp_path, ckpt, "other.pt")
    argv = ["--checkpoint", str(run / "last.pt"), str(other), "-s", "a b"]
    assert translate_main(argv) == 2
    assert "the models of an ensemble must translate the same direction" in (
        capsys.readouterr().err
    )
    same = ["--checkpoint", str(run / "last.pt"), str(run / "last.pt"), "-s", "a b"]
    assert translate_main(same) == 0
    assert "is given twice" in caplog.text


def test_eval_of_an_empty_test_set_is_refused(run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = ["--checkpoint", str(run / "last.pt"), "--src", str(empty)]
    assert eval_main([*argv, "--ref", str(empty), "--greedy"]) == 2
    assert "empty.txt: holds no sentence pairs" in capsys.readouterr().err


def test_output_paths_in_the_way_are_named_not_their_temporary_files(
    run, tmp_path, capsys
):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (tmp_path / "adir", f"{tmp_path / 'adir'}: is a folder"),
        (tmp_path / "afile" / "sub.pt", f"{tmp_path / 'afile'}: is a file"),
    ]
    for output, message in cases:
        argv = ["--inputs", str(run / "last.pt"), "--output", str(output)]
        assert average_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and ".tmp" not in err, err
