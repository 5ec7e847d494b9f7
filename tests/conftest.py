"""Shared fixtures: tiny seeded models and the location of the real corpus."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transformer.config import ModelConfig, TokenizerConfig, load_config, model_config
from transformer.models import Transformer, create_model
from transformer.tokenizer import Tokenizer

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy_copy.yaml"

SRC = [f"das ist satz nummer {i} mit {'vielen ' * (i % 7)}wörtern" for i in range(300)]
TGT = [f"this is sentence number {i} with {'many ' * (i % 7)}words" for i in range(300)]


def write(path, lines, gz=False):
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.train(TokenizerConfig(vocab_size=120), SRC, TGT)


@pytest.fixture
def corpus_dir(tmp_path):
    write(tmp_path / "train.de", SRC)
    write(tmp_path / "train.en.gz", TGT, gz=True)
    write(tmp_path / "val.de", SRC[:20])
    write(tmp_path / "val.en", TGT[:20])
    return tmp_path


def wait_for_rows(metrics: Path, rows: int, seconds: float = 120) -> None:
    """Wait until a run's metrics.jsonl holds ``rows`` rows (or time is up)."""
    deadline = time.time() + seconds
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < rows
    ):
        time.sleep(0.2)


@pytest.fixture(scope="session")
def toy_tokenizer(tmp_path_factory) -> str:
    """One SentencePiece model for all tiny runs, so that runs are comparable."""
    from transformer.config import DataConfig, TokenizerConfig
    from transformer.data import read_pairs

    pairs = list(read_pairs(DataConfig(format="copy", toy_train_size=300), "train"))
    tok = Tokenizer.train(TokenizerConfig(vocab_size=40), [s for s, _ in pairs], [])
    (path,) = tok.save(tmp_path_factory.mktemp("spm"))
    return str(path)


SMALL = [
    "data.toy_train_size=300",
    "data.toy_valid_size=20",
    "data.max_tokens=256",
    "model.d_model=32",
    "model.d_ff=64",
    "model.dropout=0.1",
    "training.valid_bleu=false",
    "training.best_metric=loss",
    "training.log_every=1",
    "training.validate_every=1000",
    "training.threads=1",
]


def train_command(run_dir, tokenizer, *extra) -> list[str]:
    """``scripts/train.py`` on the tiny toy run, as a subprocess argument list."""
    return [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--config",
        str(TOY),
        f"training.run_dir={run_dir}",
        f"data.tokenizer.model={tokenizer}",
        *SMALL,
        *extra,
    ]


def translate_cli(args: list[str], stdin: bytes = b""):
    """``scripts/translate.py`` in a subprocess, fed ``stdin``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "translate.py"), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def small_for(extra) -> list[str]:
    """``SMALL`` without the keys the architecture ``extra`` chooses lacks."""
    arch = next(
        (e.split("=", 1)[1] for e in extra if e.startswith("model.arch=")),
        "transformer",
    )
    names = {f.name for f in dataclasses.fields(ModelConfig.variant({"arch": arch}))}
    return [
        s for s in SMALL if not s.startswith("model.") or s[6:].split("=")[0] in names
    ]


def tiny(run_dir, tokenizer, *extra):
    return load_config(
        TOY,
        [
            f"training.run_dir={run_dir}",
            f"data.tokenizer.model={tokenizer}",
            f"data.cache_dir={Path(run_dir).parent / 'cache'}",
            *small_for(extra),
            *extra,
        ],
    )


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        src_vocab_size=23,
        tgt_vocab_size=23,
        d_model=32,
        n_heads=4,
        encoder_layers=2,
        decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        max_positions=64,
    )
    values.update(overrides)
    # the defaults above that the chosen architecture has (an RNN has no heads)
    arch = values.get("arch", "transformer")
    fields = dataclasses.fields(ModelConfig.variant({"arch": arch}))
    names = {f.name for f in fields}
    return model_config(**{k: v for k, v in values.items() if k in names})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return create_model(tiny_config(**overrides)).eval()


@pytest.fixture
def multi30k_dir() -> Path:
    if not (MULTI30K / "train.de.gz").exists():
        pytest.skip(f"Multi30k not found at {MULTI30K} (the shared corpus is absent)")
    return MULTI30K


def train_copy_model(
    steps: int,
    seed: int = 0,
    vocab: int = 14,
    lr: float = 3e-3,
    anneal: bool = False,
    **overrides,
) -> Transformer:
    """A small model trained for ``steps`` updates on the copy task (ids 4..vocab-1).

    ``anneal``: the learning rate falls linearly from ``lr`` to 0 over the steps.
    ``overrides`` change the architecture (``tiny_config`` keys); with different
    source and target vocabularies the copied ids are those both have.
    """
    torch.manual_seed(seed)
    values = dict(
        d_model=64,
        d_ff=128,
        max_positions=48,
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
    )
    cfg = tiny_config(**{**values, **overrides})
    model = create_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    shared = min(cfg.src_vocab_size, cfg.tgt_vocab_size)
    for step in range(steps):
        if anneal:
            opt.param_groups[0]["lr"] = lr * (1 - step / steps)
        length = int(torch.randint(3, 9, (1,)))
        body = torch.randint(4, shared, (64, length))
        src = torch.cat([body, torch.full((64, 1), 3)], 1)
        tgt_in = torch.cat([torch.full((64, 1), 2), body], 1)
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), src.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def half_trained() -> Transformer:
    """Partly trained: outputs vary with the input and end at different lengths."""
    return train_copy_model(120)


@pytest.fixture(scope="session")
def copy_model() -> Transformer:
    """Trained until it copies sentences of 3 to 7 pieces: confident outputs."""
    return train_copy_model(600)


needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None, reason="torchrun not on PATH"
)


def torchrun(tmp_path, out: Path, run: Path, *extra, env=None, wait=True):
    common = [f"data.cache_dir={tmp_path / 'cache'}", *SMALL, "training.device=cpu"]
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "torchrun",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "tests" / "ddp_worker.py"),
        str(TOY),
        str(out),
        f"training.run_dir={run}",
        *common,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of a given size (``small_fs("1536k")``), unmounted after the
    test; skipped where mounting is not permitted (CI runs as root)."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def make_read_only(mounted: Path) -> None:
    """Remount a ``small_fs`` read-only (root is refused too: EROFS)."""
    subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)


def fill(mounted: Path) -> None:
    """Use up a ``small_fs``'s free space with one file, ``filler``."""
    with open(mounted / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytest.mark.usefixtures("one_thread")``):
    results that compare engines bit for bit do not move with the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_text(fmt: str, split: str, letters: int = 20) -> list[str]:
    """The target texts of a toy split (copy or reverse) of up to 6 letters."""
    from transformer.config import DataConfig
    from transformer.data import read_pairs

    cfg = DataConfig(
        format=fmt, toy_vocab=letters, toy_max_len=6, toy_train_size=300,
        toy_valid_size=10,
    )  # fmt: skip
    return [t for _, t in read_pairs(cfg, split)]
