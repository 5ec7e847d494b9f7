"""The translation server: batching, the JSON API, its errors, the CLI, a browser."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config
from transformer.checkpoint import FORMAT_VERSION, atomic_save
from transformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Config,
    DecodingConfig,
    TokenizerConfig,
)
from transformer.inference import translate
from transformer.models import Transformer
from transformer.serve import Batcher, QueueFull, ServeConfig, load_models, main
from transformer.tokenizer import Tokenizer

for _module, _extra in (("fastapi", "serve"), ("uvicorn", "serve"), ("httpx", "dev")):
    pytest.importorskip(
        _module, reason=f"{_module} not installed: pip install -e '.[{_extra}]'"
    )

from fastapi.testclient import TestClient  # noqa: E402

from transformer.serve import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LETTERS = "abcdefghijklmnopqrst"


def letters(rng: random.Random, low: int = 2, high: int = 10) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _pad(seqs: list[list[int]], prefix: list[int], suffix: list[int]) -> torch.Tensor:
    rows = [prefix + s + suffix for s in seqs]
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def copy_checkpoint(path: Path, tokenizer: Tokenizer, pair, steps: int, seed: int):
    """A tiny model trained briefly to copy letter sentences, saved as the trainer
    saves an inference checkpoint. Half-trained: outputs vary in length and content.
    """
    torch.manual_seed(seed)
    cfg = Config()
    cfg.data.src_lang, cfg.data.tgt_lang = pair
    cfg.model = tiny_config(
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        norm_first=True,
    )
    cfg.decoding = DecodingConfig(strategy="greedy", max_len_a=1.0, max_len_b=5)
    model = Transformer(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    rng = random.Random(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * min((step + 1) / 50, (50 / (step + 1)) ** 0.5)
        ids = tokenizer.encode_src([letters(rng) for _ in range(64)])
        src = _pad(ids, [], [EOS_ID])
        logits = model(src, _pad(ids, [BOS_ID], []))
        loss = F.cross_entropy(logits.flatten(0, 1), src.flatten(), ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {
        "format": FORMAT_VERSION,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "tokenizer": tokenizer.state_dict(),
        "step": steps,
    }
    atomic_save(state, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """de->en: copies letters fairly well; en->de: a different, less trained model."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("serve")
    rng = random.Random(0)
    tokenizer = Tokenizer.train(
        TokenizerConfig(vocab_size=40), [letters(rng) for _ in range(300)], []
    )
    return [
        copy_checkpoint(folder / "de_en.pt", tokenizer, ("de", "en"), 150, 0),
        copy_checkpoint(folder / "en_de.pt", tokenizer, ("en", "de"), 40, 1),
    ]


@pytest.fixture(scope="module")
def models(checkpoints):
    return {(m.source, m.target): m for m in load_models(checkpoints, CPU)}


LIMITS = ServeConfig(max_sentences=8, max_chars=600, max_body_bytes=4000, max_beam=8)


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(list(models.values()), LIMITS)) as client:
        yield client


def reference(lm, sentences: list[str], **decoding) -> list[list[str]]:
    """The library's own translation of ``sentences``, one at a time."""
    cfg = DecodingConfig(**{**vars(lm.decoding), **decoding})
    return [
        [t.text for t in translate(lm.model, lm.tokenizer, [s], cfg, CPU)[0]]
        for s in sentences
    ]


# --- the batcher on its own ---


def test_batcher_groups_jobs_by_key_within_the_budget():
    calls = []

    def run(jobs):
        calls.append([job.payload for job in jobs])
        return [job.payload * 10 for job in jobs]

    async def scenario():
        batcher = Batcher(batch_cost=10, max_wait=0.05, max_queue=100)
        batcher.start()
        try:
            jobs = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]
            return await asyncio.gather(
                *(batcher.submit(k, 4, 1, p, run, 5.0) for k, p in jobs)
            ), dict(batcher.stats)
        finally:
            await batcher.stop()

    results, stats = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 50]
    # a's first batch stops at the budget (4 + 4 <= 10 < 12); b waits its turn
    assert calls == [[1, 3], [2, 5], [4]]
    assert stats["batches"] == 3 and stats["requests"] == 5


def test_batcher_decodes_off_the_event_loop_and_survives_failures():
    def slow(jobs):
        time.sleep(0.4)
        return [job.payload for job in jobs]

    def broken(jobs):
        raise RuntimeError("boom")

    async def scenario():
        batcher = Batcher(batch_cost=100, max_wait=0.0, max_queue=2)
        batcher.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            first = asyncio.ensure_future(batcher.submit("a", 1, 1, 1, slow, 5.0))
            await asyncio.sleep(0.05)  # the slow batch is decoding now
            late = asyncio.ensure_future(batcher.submit("b", 1, 1, 2, slow, 0.1))
            with pytest.raises(QueueFull):  # max_queue=2: one waiting, one more
                await asyncio.gather(
                    batcher.submit("c", 1, 1, 3, slow, 5.0),
                    batcher.submit("c", 1, 1, 4, slow, 5.0),
                )
            assert await first == 1
            with pytest.raises(asyncio.TimeoutError):
                await late  # timed out while queued: never decoded
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit("d", 1, 1, 5, broken, 5.0)
            after = await batcher.submit("e", 1, 1, 6, slow, 5.0)
            return ticks, after, batcher.alive, dict(batcher.stats)
        finally:
            task.cancel()
            await batcher.stop()

    ticks, after, alive, stats = asyncio.run(scenario())
    # the loop kept ticking through 0.8 s of decoding (a blocked loop: ~0 ticks)
    assert ticks >= 20
    assert after == 6 and alive
    assert stats["timeouts"] == 1 and stats["failures"] == 1
    assert stats["requests"] == 4  # a, one c, d, e: b was dropped before decoding


# --- the JSON API ---


@pytest.mark.slow
def test_translate_string_and_list_match_the_library(client, models):
    de_en = models["de", "en"]
    rng = random.Random(3)
    sentences = [letters(rng) for _ in range(5)]
    expected = reference(de_en, sentences)
    assert len({e[0] for e in expected}) > 1  # the model does not say one thing
    request = {"q": sentences[0], "source": "de", "target": "en"}
    r = client.post("/translate", json=request)
    assert r.status_code == 200
    assert r.json() == {
        "translatedText": expected[0][0],
        "alternatives": [],
        "warnings": [],
    }
    q = [sentences[1], "", sentences[2], "   ", *sentences[3:]]
    body = client.post("/translate", json={"q": q, "source": "de", "target": "en"})
    body = body.json()
    assert body["translatedText"] == [
        expected[1][0],
        "",
        expected[2][0],
        "",
        expected[3][0],
        expected[4][0],
    ]
    assert body["alternatives"] == [[]] * 6


def test_beam_alternatives_and_options(client, models):
    de_en = models["de", "en"]
    rng = random.Random(4)
    sentences = [letters(rng) for _ in range(3)]
    expected = reference(
        de_en, sentences, strategy="beam", beam_size=4, nbest=3, length_penalty=1.0
    )
    request = {"source": "de", "target": "en", "beam_size": 4, "length_penalty": 1.0}
    request["alternatives"] = 2
    body = client.post("/translate", json={**request, "q": sentences}).json()
    assert body["translatedText"] == [e[0] for e in expected]
    assert body["alternatives"] == [e[1:] for e in expected]
    assert all(len(a) == 2 for a in body["alternatives"])
    request["alternatives"] = 0
    one = client.post("/translate", json={**request, "q": sentences[0]}).json()
    assert one["translatedText"] == expected[0][0] and one["alternatives"] == []


def test_alternatives_widen_an_open_beam_and_refuse_a_set_one():
    from transformer.config import ConfigError
    from transformer.serve.models import search_settings

    base, limits = DecodingConfig(strategy="beam", beam_size=2), ServeConfig()
    widened = search_settings(base, {"alternatives": 3}, limits)
    assert (widened.beam_size, widened.nbest) == (4, 4)
    kept = search_settings(base, {"alternatives": 1, "beam_size": 6}, limits)
    assert (kept.beam_size, kept.nbest) == (6, 2)
    with pytest.raises(ConfigError, match="is more than beam_size=3"):
        search_settings(base, {"alternatives": 3, "beam_size": 3}, limits)
    greedy = DecodingConfig(strategy="greedy", nbest=1)
    assert search_settings(greedy, {}, limits).nbest == 1


def test_sampling_is_reproducible_from_its_seed(client, models):
    request = {"q": "a b c d e f", "source": "de", "target": "en", "sample": True}
    request.update(temperature=1.5, top_k=10)
    texts = {
        seed: [
            client.post("/translate", json={**request, "seed": seed}).json()[
                "translatedText"
            ]
            for _ in range(2)
        ]
        for seed in range(4)
    }
    for seed, (first, second) in texts.items():
        assert first == second
        expected = reference(
            models["de", "en"],
            [request["q"]],
            strategy="sample",
            temperature=1.5,
            top_k=10,
            seed=seed,
        )
        assert first == expected[0][0]
    assert len({t[0] for t in texts.values()}) > 1  # seeds do matter


def test_language_pairs_route_to_their_models(client, models):
    assert client.get("/languages").json() == [
        {"code": "de", "name": "de", "targets": ["en"]},
        {"code": "en", "name": "en", "targets": ["de"]},
    ]
    rng = random.Random(5)
    sentences = [letters(rng) for _ in range(4)]
    got = {}
    for pair in (("de", "en"), ("en", "de")):
        body = client.post(
            "/translate", json={"q": sentences, "source": pair[0], "target": pair[1]}
        ).json()
        got[pair] = body["translatedText"]
        assert got[pair] == [e[0] for e in reference(models[pair], sentences)]
    assert got["de", "en"] != got["en", "de"]
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert {(m["source"], m["target"]) for m in health["models"]} == set(models)


def test_long_sentences_are_truncated_with_a_warning(client, models):
    de_en = models["de", "en"]
    long = " ".join(LETTERS * 3)
    pieces = len(de_en.tokenizer.encode_src([long])[0])
    assert pieces > 63  # the model has 64 positions, one of them for <eos>
    q = ["a b c", long]
    body = client.post("/translate", json={"q": q, "source": "de", "target": "en"})
    body = body.json()
    assert body["warnings"] == [
        f"sentence 2: {pieces} pieces, more than the model's 63; only the first 63 "
        "were translated"
    ]
    assert body["translatedText"] == [e[0] for e in reference(de_en, q)]


BAD_REQUESTS = [
    ("bad JSON", b'{"q": "a b", ', 400, "not valid JSON at character 13"),
    ("not an object", b'["a b"]', 400, "invalid request"),
    ("no q", {"source": "de", "target": "en"}, 400, "q: Field required"),
    ("q a number", {"q": 3, "source": "de", "target": "en"}, 400, "q"),
    ("unknown pair", {"q": "a", "source": "de", "target": "fr"}, 400, "de->fr"),
    ("empty q", {"q": "", "source": "de", "target": "en"}, 400, "q is empty"),
    ("empty list", {"q": [], "source": "de", "target": "en"}, 400, "q is empty"),
    ("blank list", {"q": [" ", ""], "source": "de", "target": "en"}, 400, "empty"),
    ("9 sentences", {"q": ["a"] * 9, "source": "de", "target": "en"}, 413, "at most 8"),
    ("601 chars", {"q": "a" * 601, "source": "de", "target": "en"}, 413, "at most 600"),
    ("big body", {"q": ["a b"] * 1000, "source": "de", "target": "en"}, 413, "4,000"),
    ("unknown key", {"q": "a", "source": "de", "target": "en", "beam": 3}, 400, "beam"),
    ("html", {"q": "a", "source": "de", "target": "en", "format": "html"}, 400, "text"),
    (
        "greedy and sample",
        {"q": "a", "source": "de", "target": "en", "greedy": True, "sample": True},
        400,
        "exclude each other",
    ),
    (
        "greedy alternatives",
        {"q": "a", "source": "de", "target": "en", "greedy": True, "alternatives": 2},
        400,
        "alternatives need beam search",
    ),
    (
        "too many alternatives",
        {"q": "a", "source": "de", "target": "en", "alternatives": 5},
        400,
        "alternatives",
    ),
    (
        "alternatives beyond the beam set",
        {"q": "a", "source": "de", "target": "en", "beam_size": 2, "alternatives": 3},
        400,
        "alternatives + 1 = 4 hypotheses is more than beam_size=2",
    ),
    (
        "beam over the limit",
        {"q": "a", "source": "de", "target": "en", "beam_size": 9},
        400,
        "beam_size",
    ),
    (
        "top_p over 1",
        {"q": "a", "source": "de", "target": "en", "sample": True, "top_p": 2},
        400,
        "top_p",
    ),
    (
        "negative timeout",
        {"q": "a", "source": "de", "target": "en", "timeout": -1},
        400,
        "timeout",
    ),
    (
        "infinite unk_penalty",
        b'{"q": "a", "source": "de", "target": "en", "unk_penalty": -1e400}',
        400,
        "unk_penalty: must be finite",
    ),
    (
        "infinite temperature",
        b'{"q": "a", "source": "de", "target": "en", "sample": true, '
        b'"temperature": 1e400}',
        400,
        "temperature: must be finite",
    ),
    (
        "seed over 64 bits",
        {"q": "a", "source": "de", "target": "en", "sample": True, "seed": 10**23},
        400,
        "seed: 100000000000000000000000 does not fit in 64 bits",
    ),
    (
        "lone surrogate",
        b'{"q": ["a", "b \\ud800 c"], "source": "de", "target": "en"}',
        400,
        "sentence 2: not Unicode text (lone \\ud800)",
    ),
]


@pytest.mark.parametrize(
    "body, status, message",
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_4xx_with_a_message(client, body, status, message):
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        r = client.post("/translate", content=body, headers=headers)
    else:
        r = client.post("/translate", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    # the worker is alive and well after it
    ok = client.post("/translate", json={"q": "a b", "source": "de", "target": "en"})
    assert ok.status_code == 200 and isinstance(ok.json()["translatedText"], str)


def test_a_body_that_is_not_declared_json_is_explained(client):
    body = json.dumps({"q": "a b", "source": "de", "target": "en"})
    r = client.post("/translate", content=body)
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]


def test_unknown_routes_and_methods_answer_with_a_message(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    r = client.get("/translate")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}


def test_timeout_is_504_and_the_server_carries_on(client):
    before = client.get("/health").json()["timeouts"]
    q = [" ".join(LETTERS)] * 8  # decoding alone takes longer than 1 ms
    r = client.post(
        "/translate", json={"q": q, "source": "de", "target": "en", "timeout": 0.001}
    )
    assert r.status_code == 504
    assert "did not finish within 0.001 s" in r.json()["error"]
    assert client.get("/health").json()["timeouts"] == before + 1
    r = client.post("/translate", json={"q": q, "source": "de", "target": "en"})
    assert r.status_code == 200 and len(r.json()["translatedText"]) == 8


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_attention_heat_map_is_a_png_sized_to_the_sentence(client):
    sizes = []
    for q in ("a b", "a b c d e f g h i j k l"):
        r = client.post("/attention", json={"q": q, "source": "de", "target": "en"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        sizes.append(png_size(r.content))
    assert sizes[1][0] > sizes[0][0]  # one column per source piece
    request = {"q": "a b", "source": "de", "target": "en", "layer": 1, "head": 3}
    assert client.post("/attention", json=request).status_code == 200
    for bad, message in ((dict(layer=2), "layer"), (dict(head=4), "head")):
        r = client.post("/attention", json={**request, **bad})
        assert r.status_code == 400 and message in r.json()["error"]
    r = client.post("/attention", json={**request, "q": " "})
    assert r.status_code == 400 and "empty" in r.json()["error"]


def test_page_and_api_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="translate"' in page.text
    assert "http" not in page.text.split("<script>")[1]  # nothing from elsewhere
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/translate", "/languages", "/health", "/attention"} <= set(paths)


# --- the command line and a real server ---


@pytest.mark.slow
def test_import_needs_neither_fastapi_nor_uvicorn():
    code = (
        "import sys, transformer, transformer.serve; "
        "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()


def test_cli_user_errors_are_one_line(checkpoints, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    twice = [str(checkpoints[0])] * 2
    assert main(["--checkpoint", twice[0], "--checkpoint", twice[1]]) == 2
    assert "both translate de->en" in capsys.readouterr().err
    assert main(["--checkpoint", twice[0], "--batch-tokens", "0"]) == 2
    assert "batch_tokens" in capsys.readouterr().err
    assert main(["--checkpoint", twice[0], "--device", "foo"]) == 2
    assert "--device: 'foo' is not a device" in capsys.readouterr().err
    for option, value, message in [
        ("--port", "99999", "--port: must be in [0, 65535]"),
        ("--threads", "-1", "--threads: must be >= 0"),
        ("--log-level", "bogus", "invalid choice: 'bogus'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(["--checkpoint", twice[0], option, value])
        assert exit.value.code == 2
        assert message in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(checkpoints):
    """``python3 -m transformer.serve`` on 127.0.0.1 with a 100 ms batching window."""
    port = free_port()
    cmd = [sys.executable, "-m", "transformer.serve", "--port", str(port)]
    for path in checkpoints:
        cmd += ["--checkpoint", str(path)]
    cmd += ["--max-wait-ms", "100", "--threads", "1", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                http(url + "/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the server did not start:\n" + proc.stderr.read().decode()
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_concurrent_requests_are_decoded_in_shared_batches(server, models):
    rng = random.Random(6)
    sentences = [letters(rng) for _ in range(12)]
    greedy = reference(models["de", "en"], sentences)
    beam = reference(models["de", "en"], sentences, strategy="beam", beam_size=3)
    # one at a time: one batch each
    before = http(server + "/health")
    for s, e in zip(sentences[:3], greedy[:3], strict=True):
        body = http(server + "/translate", {"q": s, "source": "de", "target": "en"})
        assert body["translatedText"] == e[0]
    after = http(server + "/health")
    assert after["batches"] - before["batches"] == 3
    # 24 at once, half greedy and half beam 3: two kinds of batch, few of each
    start = threading.Barrier(24)

    def send(i: int) -> str:
        request = {"q": sentences[i % 12], "source": "de", "target": "en"}
        if i >= 12:
            request["beam_size"] = 3
        start.wait(timeout=30)
        return http(server + "/translate", request)["translatedText"]

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(send, range(24)))
    final = http(server + "/health")
    assert results == [e[0] for e in greedy] + [e[0] for e in beam]
    assert final["requests"] - after["requests"] == 24
    batches = final["batches"] - after["batches"]
    assert 2 <= batches <= 8, final  # 24 one at a time would be 24 batches
    assert final["largest_batch"] >= 4


@pytest.mark.slow
def test_browser_translates_and_shows_the_attention_map(server, models, tmp_path):
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed: pip install -e '.[dev]'"
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("chromium not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1200,1000")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pair option")) == 2)
        sentence = "a b c d e f g"
        expected = reference(models["de", "en"], [sentence])[0][0]
        Select(driver.find_element(By.ID, "pair")).select_by_value("de|en")
        driver.find_element(By.ID, "source-text").send_keys(sentence)
        driver.find_element(By.ID, "translate").click()
        wait.until(lambda d: d.find_element(By.ID, "output").text)
        shown = driver.find_element(By.ID, "output").text
        assert shown.split() == expected.split() and shown
        loaded = "const i = document.getElementById('attention'); return i.naturalWidth"
        wait.until(lambda d: d.execute_script(loaded) > 0)
        if os.environ.get("SERVE_SCREENSHOT"):
            driver.save_screenshot(os.environ["SERVE_SCREENSHOT"])
        # required terms: beam search puts them in the output
        Select(driver.find_element(By.ID, "strategy")).select_by_value("beam")
        driver.find_element(By.ID, "show-attention").click()  # off
        driver.find_element(By.ID, "terms").send_keys("q r; t")
        driver.execute_script("document.getElementById('output').textContent = ''")
        driver.find_element(By.ID, "translate").click()
        wait.until(lambda d: d.find_element(By.ID, "output").text)
        shown = driver.find_element(By.ID, "output").text
        assert "q r" in shown and "t" in shown.split(), shown
        # an empty box: the server's message is shown
        driver.find_element(By.ID, "source-text").clear()
        driver.find_element(By.ID, "translate").click()
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert "q is empty" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()


def test_every_search_option_reaches_the_search(client, models):
    """An option of the search, here unk_penalty, as the library applies it."""
    q = ["a b c d", "e f g"]
    request = {"q": q, "source": "de", "target": "en", "greedy": True}
    for penalty in (0.0, -30.0):
        body = client.post("/translate", json={**request, "unk_penalty": penalty})
        expected = reference(
            models["de", "en"], q, strategy="greedy", nbest=1, unk_penalty=penalty
        )
        assert body.json()["translatedText"] == [e[0] for e in expected]
    plain = reference(models["de", "en"], q, strategy="greedy", nbest=1)
    assert expected != plain  # the option changed what the server answered
