"""transformer-score: the log-probability a checkpoint (or an ensemble) gives
each target sentence of parallel files, a JSON-lines file or a split of its
corpus; resumable when written to a file (``--output``)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from transformer.checkpoint import WEIGHTS
from transformer.cli.common import check_output, run_cli, setup_logging
from transformer.config import ConfigError, DataConfig
from transformer.data import read_jsonl_pairs, read_pairs, read_text_pairs
from transformer.files import atomic_write_bytes
from transformer.inference import Translator
from transformer.scoring import PairScore

log = logging.getLogger("transformer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-score",
        description="Score given translations: per pair, the log-probability of "
        "the target after the source (its pieces and </s>), their number and the "
        "average; tab-separated, or JSON lines with --json.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        action="extend",
        help="a .pt checkpoint; several score as an ensemble (the log of their "
        "mean probability)",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="raw",
        help="raw: the trained weights; ema: their moving average",
    )
    given = parser.add_argument_group("the pairs (one of)")
    given.add_argument("--src", help="source file (with --tgt), one sentence a line")
    given.add_argument("--tgt", help="target file, line by line with --src")
    given.add_argument(
        "--jsonl", help='JSON lines {"src": ..., "tgt": ...} (blank lines skipped)'
    )
    given.add_argument("--split", help="a split of the checkpoint's corpus (val)")
    parser.add_argument("--data-dir", help="override data.dir of the checkpoint")
    parser.add_argument("--src-lang", help="source language (multilingual models)")
    parser.add_argument("--tgt-lang", help="target language")
    parser.add_argument(
        "--per-token", action="store_true", help="also each piece's log-probability"
    )
    parser.add_argument("--json", action="store_true", help="write JSON lines")
    parser.add_argument(
        "--output",
        help="write here instead of standard output, in chunks, with a progress "
        "file beside it (OUTPUT.progress): a rerun continues where it stopped",
    )
    parser.add_argument(
        "--chunk-pairs",
        type=int,
        default=10_000,
        help="pairs scored and written at a time (default 10000)",
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        help="tokens per batch (default: the checkpoint's decoding.max_tokens)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="weights and activations (default: the checkpoint's decoding.precision)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    return parser


def _pairs(args, translator: Translator, way) -> Iterator[tuple[str, str]]:
    """The pairs the options name."""
    chosen = [
        name
        for name, given in (
            ("--src/--tgt", args.src or args.tgt),
            ("--jsonl", args.jsonl),
            ("--split", args.split),
        )
        if given
    ]
    if len(chosen) != 1:
        raise ConfigError(
            "give the pairs as --src and --tgt, --jsonl or --split"
            + (f" (got {' and '.join(chosen)})" if chosen else "")
        )
    if args.src or args.tgt:
        if not (args.src and args.tgt):
            raise ConfigError("--src and --tgt go together")
        return read_text_pairs(Path(args.src), Path(args.tgt))
    if args.jsonl:
        fields = DataConfig(format="jsonl", src_field="src", tgt_field="tgt")
        return read_jsonl_pairs(Path(args.jsonl), fields)
    data = translator.config.data
    if translator.multilingual:
        data = data.direction(way.src, way.tgt)
    if args.data_dir:
        data = dataclasses.replace(data, dir=args.data_dir)
    from transformer.data.download import ensure_corpus

    data = ensure_corpus(data)
    return read_pairs(data, args.split, translator.config.training.seed)


def _identity(args) -> dict:
    """What a resumed run must share with the one that wrote the progress file:
    the files read (path, size, modification time) and the options."""

    def stamp(path: str | None) -> list | None:
        if not path:
            return None
        p = Path(path).resolve()
        info = p.stat()
        return [str(p), info.st_size, info.st_mtime_ns]

    return {
        "checkpoints": [stamp(c) for c in args.checkpoint],
        "inputs": [stamp(args.src), stamp(args.tgt), stamp(args.jsonl)],
        "options": [
            args.split,
            args.data_dir,
            args.src_lang,
            args.tgt_lang,
            args.weights,
            args.per_token,
            args.json,
            args.precision,
        ],
    }


def _line(score: PairScore, as_json: bool, per_token: bool) -> str:
    if as_json:
        if score.error is not None:
            return json.dumps({"error": score.error})
        out = {"score": score.total, "pieces": score.pieces, "average": score.average}
        if per_token:
            out["tokens"] = score.tokens
        return json.dumps(out)
    fields = [f"{score.total:.6f}", str(score.pieces), f"{score.average:.6f}"]
    if per_token:
        fields.append(" ".join(f"{t:.6f}" for t in score.tokens or []))
    return "\t".join(fields)


class _Progress:
    """``OUTPUT.progress``: pairs written, the output's size after them, and the
    run's identity; updated atomically after every chunk."""

    def __init__(self, output: Path, identity: dict) -> None:
        self.output, self.path = output, Path(f"{output}.progress")
        self.identity = identity
        self.key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        self.pairs = self.bytes = 0
        self.complete = False
        if self.path.exists():
            try:
                state = json.loads(self.path.read_text(encoding="utf-8"))
                key, pairs, size = state["key"], state["pairs"], state["bytes"]
                complete = bool(state.get("complete"))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{self.path}: not a progress file ({e})") from None
            if key != self.key:
                raise ConfigError(
                    f"{self.path} was written for other checkpoints, inputs or "
                    f"options; delete it and {output} to score again"
                )
            have = output.stat().st_size if output.exists() else -1
            if have < size:
                raise ConfigError(
                    f"{output} is shorter ({have} bytes) than {self.path} says "
                    f"({size}); delete both to score again"
                )
            self.pairs, self.bytes, self.complete = pairs, size, complete

    def start(self) -> None:
        """Cut the output back to what the progress file counts."""
        with open(self.output, "ab") as f:
            f.truncate(self.bytes)

    def write(self, text: str, pairs: int, complete: bool = False) -> None:
        data = text.encode("utf-8")
        with open(self.output, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.pairs += pairs
        self.bytes += len(data)
        state = {"key": self.key, "pairs": self.pairs, "bytes": self.bytes}
        state |= {"complete": complete, "run": self.identity}
        atomic_write_bytes(self.path, (json.dumps(state) + "\n").encode())


def _score(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.chunk_pairs < 1:
        raise ConfigError(f"--chunk-pairs: must be >= 1 (got {args.chunk_pairs})")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise ConfigError(f"--batch-tokens: must be >= 1 (got {args.batch_tokens})")
    check_output(args.output, "--output")
    setup_logging()
    progress = None
    if args.output:
        progress = _Progress(Path(args.output), _identity(args))
        if progress.complete:
            print(f"{args.output}: already complete ({progress.pairs} pairs)")
            return 0
    translator = Translator.load(args.checkpoint, args.device, args.weights)
    way = translator.direction(args.src_lang, args.tgt_lang)
    translator.cast(args.precision or translator.config.decoding.precision)
    max_tokens = args.batch_tokens or translator.config.decoding.max_tokens
    pairs = _pairs(args, translator, way)
    skip = progress.pairs if progress else 0
    if progress is not None:
        progress.start()
        if skip:
            log.info("%s: %d pairs done, continuing after them", args.output, skip)
    pairs = itertools.islice(pairs, skip, None)
    number, refused = skip, 0
    while chunk := list(itertools.islice(pairs, args.chunk_pairs)):
        scores = translator.score(
            [s for s, _ in chunk],
            [t for _, t in chunk],
            way,
            max_tokens,
            args.per_token,
        )
        lines = []
        for score in scores:
            number += 1
            if score.error is not None:
                refused += 1
                log.warning("pair %d: not scored: %s", number, score.error)
            lines.append(_line(score, args.json, args.per_token) + "\n")
        if progress is not None:
            progress.write("".join(lines), len(chunk))
            log.info("%d pairs scored", number)
        else:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
    if progress is not None:
        progress.write("", 0, complete=True)
    if refused:
        log.warning(
            "%d of %d pairs not scored (their lines say nan / error)", refused, number
        )
    return 0


def score_main(argv: list[str] | None = None) -> int:
    return run_cli(_score, argv)
