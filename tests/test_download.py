"""First-run downloads from a server the test starts on 127.0.0.1: a good download,
one cut off that resumes, a wrong checksum, a 404, no network, no source."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import transformer.data.download
from tests.conftest import SRC, TGT
from transformer.cli.train import preprocess_main
from transformer.config import DataConfig
from transformer.data import DataError
from transformer.data.download import ensure_corpus

FILES = {
    "train.de.gz": gzip.compress(("\n".join(SRC) + "\n").encode()),
    "train.en.gz": gzip.compress(("\n".join(TGT) + "\n").encode()),
    "val.de.gz": gzip.compress(("\n".join(SRC[:10]) + "\n").encode()),
    "val.en.gz": gzip.compress(("\n".join(TGT[:10]) + "\n").encode()),
}
SUMS = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}


class Server:
    """Serves FILES under /corpus/, with Range; ``cut_once`` names files whose
    first answer stops halfway (the connection closes)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()
        self.drip: set[str] = set()  # files sent a byte at a time, slowly
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                name = self.path.removeprefix("/corpus/")
                server.requests.append((name, self.headers.get("Range")))
                data = FILES.get(name)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
                    )
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if name in server.drip:
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/corpus"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def config(tmp_path, url: str, sums=None) -> DataConfig:
    cfg = DataConfig(
        dir=str(tmp_path / "not-here"),
        source_url=url,
        source_files=dict(sums or SUMS),
        download_dir=str(tmp_path / "downloads"),
    )
    cfg.validate()
    return cfg


def test_download_verifies_and_is_reused(tmp_path, server, caplog):
    cfg = config(tmp_path, server.url)
    with caplog.at_level("INFO"):
        resolved = ensure_corpus(cfg)
    folder = tmp_path / "downloads"
    assert resolved.dir == str(folder)
    assert cfg.dir != resolved.dir  # the loaded settings are not changed
    assert f"into {folder}" in caplog.text  # the log names the cache folder
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data
    assert not list(folder.glob("*.part"))
    asked = len(server.requests)
    ensure_corpus(config(tmp_path, server.url))  # present and verified: no request
    assert len(server.requests) == asked == len(FILES)


def test_a_cut_off_download_resumes(tmp_path, server, caplog):
    server.cut_once = {"train.de.gz"}
    cfg = config(tmp_path, server.url)
    ensure_corpus(cfg)
    assert (tmp_path / "downloads" / "train.de.gz").read_bytes() == FILES["train.de.gz"]
    tries = [r for name, r in server.requests if name == "train.de.gz"]
    half = (len(FILES["train.de.gz"])) // 2
    assert tries == [None, f"bytes={half}-"]  # the second try asked for the rest
    assert "try 1 of 3 failed" in caplog.text


@pytest.mark.slow
def test_a_stalled_download_fails_each_try_then_names_the_remedy(
    tmp_path, server, caplog, monkeypatch
):
    # a byte every 0.05 s never trips the socket timeout; the stall check does
    monkeypatch.setattr(transformer.data.download, "STALL_SECONDS", 0.5)
    server.drip = {"train.de.gz"}
    with pytest.raises(DataError, match="stalled: .* bytes in the last 0.5 s"):
        ensure_corpus(config(tmp_path, server.url))
    assert caplog.text.count("train.de.gz: try") == 3


def test_a_wrong_checksum_leaves_nothing_behind(tmp_path, server):
    sums = {**SUMS, "val.en.gz": "0" * 64}
    with pytest.raises(DataError) as e:
        ensure_corpus(config(tmp_path, server.url, sums))
    assert "val.en.gz: sha256" in str(e.value)
    assert "does not match the expected " + "0" * 64 in str(e.value)
    folder = tmp_path / "downloads"
    assert not (folder / "val.en.gz").exists()
    assert not list(folder.glob("*.part"))


def test_a_missing_file_is_a_clear_error(tmp_path, server):
    sums = {**SUMS, "test.de.gz": "1" * 64}
    with pytest.raises(
        DataError, match=r"cannot download .*/corpus/test\.de\.gz: HTTP 404"
    ):
        ensure_corpus(config(tmp_path, server.url, sums))


def test_offline_names_both_remedies(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as e:
        ensure_corpus(config(tmp_path, f"http://127.0.0.1:{port}/corpus"))
    message = str(e.value)
    assert "cannot download" in message and "data.dir=PATH" in message
    with pytest.raises(DataError) as e:
        ensure_corpus(DataConfig(dir=str(tmp_path / "not-here")))
    assert "data directory not found" in str(e.value)
    assert "data.dir=PATH" in str(e.value) and "data.source_url" in str(e.value)


def test_first_run_downloads_then_builds_the_store(tmp_path, server, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "multi30k_de_en.yaml"
    files = ", ".join(f"{k}: {v}" for k, v in SUMS.items())
    code = preprocess_main(
        [
            "--config",
            str(config),
            f"data.dir={tmp_path / 'not-here'}",
            f"data.source_url={server.url}",
            f"data.source_files={{{files}}}",
            f"data.download_dir={tmp_path / 'downloads'}",
            f"training.run_dir={tmp_path / 'run'}",
            "data.tokenizer.vocab_size=100",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert f"{len(SRC)} pairs kept" in capsys.readouterr().out
