"""Every place that writes fails in one line on a full or a read-only disk and
leaves no partial file; the processes we start end with their parent."""

from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import fill, make_read_only, tiny
from transformer.cli.evaluate import eval_main
from transformer.cli.train import average_main
from transformer.config import load_config, save_config
from transformer.data import DataError, open_store
from transformer.training import Trainer
from transformer.training.progress import MetricsLog


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, toy_tokenizer):
    run = tmp_path_factory.mktemp("tiny") / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=2")).train()
    return run


def write_config(folder, run, capsys):
    save_config(load_config(run / "config.yaml"), folder / "config.yaml")


def write_metrics(folder, run, capsys):
    MetricsLog(folder, True, False).record("train", 1, {"loss": 1.0, "x": "y" * 9000})


def write_store(folder, run, capsys):
    cfg = load_config(run / "config.yaml")
    from transformer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_files(cfg.data.tokenizer)
    open_store(cfg.data, "train", tokenizer, folder / "cache")


def write_average(folder, run, capsys):
    args = ["--inputs", str(run / "last.pt"), "--output", str(folder / "avg.pt")]
    return average_main(args), capsys.readouterr().err


def write_hypotheses(folder, run, capsys):
    args = ["--checkpoint", str(run / "last.pt"), "--split", "val", "--greedy"]
    return eval_main([*args, "--output", str(folder / "hyps.txt")]), (
        capsys.readouterr().err
    )


def write_export(folder, run, capsys):
    pytest.importorskip("ctranslate2")
    from transformer.export import main

    args = ["--checkpoint", str(run / "last.pt"), "--output", str(folder / "ct2")]
    return main(args), capsys.readouterr().err


def write_curves(folder, run, capsys):
    from transformer.plots import plot_metrics

    plot_metrics(folder)


WRITERS = {
    "config.yaml": write_config,
    "metrics.jsonl": write_metrics,
    "corpus store": write_store,
    "transformer-average": write_average,
    "transformer-eval hypotheses": write_hypotheses,
    "curves.png": write_curves,
    "transformer-export": write_export,
}


@pytest.mark.parametrize("disk", ["full", "read-only"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_write_on_a_full_or_read_only_disk_is_one_line(
    tiny_run, small_fs, capsys, writer, disk
):
    folder = small_fs("256k")
    (folder / "metrics.jsonl").write_text(  # a row already there (and curves' input)
        (tiny_run / "metrics.jsonl").read_text().splitlines()[0] + "\n"
    )
    before = (folder / "metrics.jsonl").read_bytes()
    if disk == "full":
        fill(folder)
    else:
        make_read_only(folder)
    try:
        outcome = WRITERS[writer](folder, tiny_run, capsys)
    except (OSError, DataError) as e:
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) else str(e)
        assert isinstance(e, DataError) or e.filename is not None
    else:
        assert outcome is not None, f"{writer} wrote on a {disk} disk"
        status, err = outcome
        assert status == 2 and "Traceback" not in err, err
        (message,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "\n" not in message and str(folder) in message, message
    reason = "No space left on device" if disk == "full" else "Read-only file system"
    assert reason in message, message
    # nothing written but folders made on the way (the store's cache folder)
    left = sorted(
        p.name for p in folder.iterdir() if not p.is_dir() or any(p.iterdir())
    )
    assert left == sorted(["metrics.jsonl", *(["filler"] if disk == "full" else [])])
    assert (folder / "metrics.jsonl").read_bytes() == before  # no partial row


def test_a_download_that_cannot_be_written_is_one_line_and_leaves_no_part(
    tmp_path, small_fs
):
    from tests.test_download import Server, config
    from transformer.data.download import ensure_corpus

    server = Server()
    try:
        folder = small_fs("64k")
        cfg = config(tmp_path, server.url)
        cfg.download_dir = str(folder / "downloads")
        fill(folder)
        with pytest.raises(DataError) as e:
            ensure_corpus(cfg)
        message = str(e.value)
        assert message.startswith(f"cannot write {folder / 'downloads'}/")
        assert ".part: No space left on device; the download was deleted" in message
        assert len(server.requests) == 1  # a full disk is not retried
        assert list((folder / "downloads").iterdir()) == []
    finally:
        server.close()


def test_the_servers_decoding_thread_ends_with_the_server(tiny_run):
    pytest.importorskip("fastapi")
    import torch
    from fastapi.testclient import TestClient

    from transformer.serve import create_app
    from transformer.serve.models import load_models

    models = load_models([tiny_run / "last.pt"], torch.device("cpu"))
    before = {t.ident for t in threading.enumerate()}
    with TestClient(create_app(models)) as client:
        pair = {"source": models[0].source, "target": models[0].target}
        got = client.post("/translate", json={"q": "a b c", **pair})
        assert got.status_code == 200, got.text
        assert any(t.name.startswith("decode") for t in threading.enumerate())
    left = [t for t in threading.enumerate() if t.ident not in before]
    assert not [t.name for t in left if t.name.startswith("decode")]


def test_the_run_config_is_written_whole(tmp_path, tiny_run):
    target = tmp_path / "config.yaml"
    save_config(load_config(tiny_run / "config.yaml"), target)
    assert load_config(target).to_dict() == json.loads(
        json.dumps(load_config(tiny_run / "config.yaml").to_dict())
    )
