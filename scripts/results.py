"""The results table: each row's search chosen on the validation set, then the test
set scored once with that choice, written as JSON with what reproduces each number.

    python scripts/results.py --out results/multi30k_en_de.json --beams 5 \
        --alphas 1.0 2.0 3.0 \
        --row single=models/en_de_a.safetensors \
        --row ensemble=models/en_de_a.safetensors,models/en_de_b.safetensors

A row is one checkpoint or an ensemble of several (comma-separated). For each row
every beam size and GNMT alpha decodes the validation split (data.valid_split of
the row's first checkpoint); the setting with the highest validation BLEU (the
smaller beam, then the smaller alpha, on a tie) is the only one that decodes the
test split (data.test_split, or --test-split). A name given to several --row
options names candidates for one row (which members, which steps): each is swept
on the validation split, and only the best candidate's best setting (the earlier
candidate on a tie) decodes the test split. The JSON holds the whole validation
sweep of every candidate, the test scores with their sacreBLEU signatures, each
checkpoint's size and sha256, and the ``transformer-eval`` command that gives the
test number again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
from pathlib import Path

from transformer.config import ConfigError
from transformer.files import sha256_of

ROOT = Path(__file__).resolve().parents[1]


def choose(sweep: dict[tuple[int, float], float]) -> tuple[int, float]:
    """The (beam, alpha) with the best validation BLEU; the smaller beam, then the
    smaller alpha, on a tie."""
    return max(sorted(sweep), key=lambda setting: sweep[setting])


def describe(path: Path) -> dict:
    size = path.stat().st_size / 2**20
    return {"file": str(path), "mib": size, "sha256": sha256_of(path)}


def parse_row(text: str) -> tuple[str, list[Path], str | None]:
    """``NAME=CHECKPOINT[,CHECKPOINT...][@SRC-TGT]`` -> name, paths, direction."""
    name, sep, rest = text.partition("=")
    files, _, way = rest.partition("@")
    paths = [Path(f) for f in files.split(",") if f]
    if not sep or not name or not paths:
        raise ConfigError(
            f"--row {text!r}: expected NAME=CHECKPOINT[,CHECKPOINT...][@SRC-TGT]"
        )
    if not re.fullmatch(r"[\w .+>-]+", name):
        raise ConfigError(f"--row {name!r}: a name of letters, digits, ' ', . + - > _")
    if way and not re.fullmatch(r"\w+-\w+", way):
        raise ConfigError(f"--row {text!r}: a direction is SRC-TGT (e.g. @de-en)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"--row {name}: no such checkpoint: {', '.join(missing)}")
    return name, paths, way or None


def parse_row_beams(text: str) -> tuple[str, list[int]]:
    """``NAME=BEAM[,BEAM...]`` -> name, beam sizes (each >= 1)."""
    name, _, beams = text.partition("=")
    try:
        sizes = [int(b) for b in beams.split(",")]
    except ValueError:
        sizes = []
    if not name or not sizes or min(sizes) < 1:
        raise ConfigError(
            f"--row-beams {text!r}: expected NAME=BEAM[,BEAM...], each beam >= 1"
        )
    return name, sizes


def score_row(
    name: str, candidates: list[list[Path]], args, way: str | None = None
) -> dict:
    """Sweep each candidate on the validation split, decode the test split once
    with the best candidate's best setting; ``way``: a multilingual model's
    direction (``de-en``)."""
    swept, best = [], None  # one candidate's models at a time besides the best
    for paths in candidates:
        c = sweep_candidate(name, paths, args, way)
        if best is not None and (c["valid"], c["test"], c["direction"]) != (
            best["valid"],
            best["test"],
            best["direction"],
        ):
            raise ConfigError(
                f"--row {name}: {paths[0]} and {candidates[0][0]} translate "
                "different directions or splits: candidates of a row must not"
            )
        if best is None or top(c["sweep"]) > top(best["sweep"]):  # earlier on a tie
            best = c
        swept.append(c["sweep"])
    beam, alpha = choose(best["sweep"])
    paths, precision, decode = best["paths"], best["precision"], best["decode"]
    scores = decode(best["test"], beam, alpha)
    hypotheses = scores.pop("hypotheses")
    print(
        f"{name}: {best['test']} beam {beam} alpha {alpha}: BLEU {scores['bleu']:.2f}"
    )
    command = ["transformer-eval", "--checkpoint", *map(str, paths)]
    if args.weights != "raw":
        command += ["--weights", args.weights]
    command += ["--split", best["test"], "--beam", str(beam)]
    command += ["--length-penalty", str(alpha), "--device", "cpu"]
    command += ["--precision", precision]
    if way:
        command += [
            "--src-lang",
            best["direction"][0],
            "--tgt-lang",
            best["direction"][1],
        ]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    row = {
        "row": name,
        "checkpoints": [describe(p) for p in paths],
        "weights": args.weights,
        "precision": precision,
        "valid_split": best["valid"],
        "valid_bleu": sweep_list(best["sweep"]),
        "beam": beam,
        "alpha": alpha,
        "valid_bleu_chosen": best["sweep"][beam, alpha],
        "test_split": best["test"],
        "test": scores,
        "direction": "-".join(best["direction"]),
        "command": shlex.join(command),
        "_hypotheses": hypotheses,  # the test output, for callers; not written
    }
    if len(candidates) > 1:
        row["candidates"] = [
            {"checkpoints": [str(p) for p in paths], "valid_bleu": sweep_list(sweep)}
            for paths, sweep in zip(candidates, swept, strict=True)
        ]
    return row


def top(sweep: dict[tuple[int, float], float]) -> float:
    return sweep[choose(sweep)]


def sweep_list(sweep: dict[tuple[int, float], float]) -> list[dict]:
    return [{"beam": b, "alpha": a, "bleu": bleu} for (b, a), bleu in sweep.items()]


def sweep_candidate(name: str, paths: list[Path], args, way: str | None = None) -> dict:
    """One candidate's validation sweep, and what decodes its test split."""
    from transformer.data import read_pairs
    from transformer.data.download import ensure_corpus
    from transformer.evaluation import score_corpus
    from transformer.inference import Translator

    translator = Translator.load(paths, "cpu", args.weights)
    cfg = translator.config
    translator.cast(cfg.decoding.precision)  # as transformer-eval does
    precision = translator.precision
    src, _, tgt = way.partition("-") if way else (None, "", None)
    direction = translator.direction(src, tgt)
    data = cfg.data.direction(direction.src, direction.tgt)
    if args.data_dir:
        data = dataclasses.replace(data, dir=args.data_dir)
    data = ensure_corpus(data)
    valid, test = cfg.data.valid_split, args.test_split or cfg.data.test_split
    if not test:
        raise ConfigError(f"--row {name}: the config has no data.test_split")
    for split in (valid, test):  # a missing split fails before the sweep's work
        next(iter(read_pairs(data, split, cfg.training.seed)), None)

    def decode(split: str, beam: int, alpha: float) -> dict:
        pairs = list(read_pairs(data, split, cfg.training.seed))
        dcfg = translator.decoding({"beam_size": beam, "length_penalty": alpha})
        results = translator.translate([s for s, _ in pairs], dcfg, way=direction)
        hyps = [r[0].text for r in results]
        return {**score_corpus(hyps, [t for _, t in pairs]), "hypotheses": hyps}

    label = name if len(paths) == 1 else f"{name} [{', '.join(p.name for p in paths)}]"
    sweep = {}
    for beam in args.row_beams.get(name, args.beams):
        for alpha in args.alphas if beam > 1 else args.alphas[:1]:  # greedy: once
            sweep[beam, alpha] = bleu = decode(valid, beam, alpha)["bleu"]
            print(f"{label}: {valid} beam {beam} alpha {alpha}: BLEU {bleu:.2f}")
    return {
        "paths": paths,
        "sweep": sweep,
        "precision": precision,
        "decode": decode,
        "valid": valid,
        "test": test,
        "direction": (direction.src, direction.tgt),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| row | BLEU | BLEU (lc) | chrF | val BLEU | beam | alpha | files |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        files = ", ".join(f"`{c['file']}`" for c in r["checkpoints"])
        t = r["test"]
        lines.append(
            f"| {r['row']} | {t['bleu']:.2f} | {t['bleu_lc']:.2f} | {t['chrf']:.2f} "
            f"| {r['valid_bleu_chosen']:.2f} | {r['beam']} | {r['alpha']} | {files} |"
        )
    return "\n".join(lines)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--row",
        action="append",
        required=True,
        help="NAME=CHECKPOINT[,CHECKPOINT...]: one model or an ensemble",
    )
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--beams", type=int, nargs="+", default=[5])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument(
        "--row-beams",
        action="append",
        default=[],
        metavar="NAME=BEAM[,BEAM...]",
        help="the beam sizes swept for row NAME instead of --beams (1: greedy)",
    )
    parser.add_argument(
        "--not-published",
        action="append",
        default=[],
        metavar="NAME",
        help="row NAME compares, its checkpoints stay out of models/",
    )
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw")
    parser.add_argument("--data-dir", help="override data.dir of the checkpoints")
    parser.add_argument("--test-split", help="default: data.test_split")
    args = parser.parse_args(argv)
    rows: dict[str, list[list[Path]]] = {}  # a name given twice: candidates
    ways: dict[str, str | None] = {}
    for name, paths, way in map(parse_row, args.row):
        if paths in rows.get(name, []):
            raise ConfigError(f"--row {name}: the same checkpoints twice")
        if ways.setdefault(name, way) != way:
            raise ConfigError(f"--row {name}: its candidates name other directions")
        rows.setdefault(name, []).append(paths)
    if min(args.beams) < 1:
        raise ConfigError(f"--beams: must be >= 1 (got {args.beams})")
    args.row_beams = dict(map(parse_row_beams, args.row_beams))
    for name in [*args.row_beams, *args.not_published]:
        if name not in rows:
            raise ConfigError(f"--row-beams / --not-published {name}: no such --row")
    if not all(math.isfinite(a) for a in args.alphas):
        raise ConfigError(f"--alphas: must be finite numbers (got {args.alphas})")
    from bench_common import machine

    result = {
        "selection": "candidate, beam and alpha by validation BLEU; test decoded once",
        "rows": [
            score_row(name, candidates, args, ways[name])
            for name, candidates in rows.items()
        ],
        "machine": machine(),
    }
    for row in result["rows"]:
        row.pop("_hypotheses")
        if row["row"] in args.not_published:
            row["published"] = False
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result["rows"]))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from transformer.cli.common import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
