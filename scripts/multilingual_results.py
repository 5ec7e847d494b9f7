"""The multilingual results: one model's every direction beside bilingual models,
its zero-shot directions beside pivoting through English with the same model, and
the off-target rate of each (outputs in a language other than the one asked for).

    python scripts/multilingual_results.py --out results/multi30k_multilingual.json \
        --model models/multi30k_multilingual.safetensors \
        --bilingual de-en=checkpoints/bi_de_en/best.pt ... \
        --zero-shot de-fr fr-de de-cs cs-de --pivot en --beams 1 5 --alphas 1.0 2.0

Every row is chosen as ``scripts/results.py`` chooses: beam and alpha on the
validation split, the test split decoded once. A pivot (src -> en -> tgt) decodes
each leg with the setting its own direction's row chose on validation. Languages
are identified with py3langid (its wheel ships the model; the ``multilingual``
extra), restricted to the model's languages; its accuracy on the validation
split of those languages is recorded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import describe, score_row  # noqa: E402
from transformer.config import ConfigError  # noqa: E402


def language_identifier(langs: list[str]):
    """py3langid's classifier restricted to ``langs``; ``classify(text) -> lang``."""
    try:
        import py3langid.langid as langid
    except ImportError as e:
        raise ConfigError(
            "language identification needs py3langid: pip install -e '.[multilingual]'"
        ) from e
    model = Path(langid.__file__).parent / "data" / "model.npz.xz"
    identifier = langid.LanguageIdentifier.from_modelpath(model, norm_probs=True)
    identifier.set_languages(langs)
    return lambda text: identifier.classify(text)[0]


def off_target(hypotheses: list[str], lang: str, identify) -> float:
    """The share of non-empty outputs identified as another language than ``lang``."""
    texts = [h for h in hypotheses if h.strip()]
    return sum(identify(h) != lang for h in texts) / max(len(texts), 1)


def identifier_accuracy(data_dir: Path, split: str, langs: list[str], identify):
    """Accuracy of ``identify`` on the ``split`` files of ``langs`` (one a line)."""
    from transformer.data import read_lines

    right = total = 0
    for lang in langs:
        files = [data_dir / f"{split}.{lang}.gz", data_dir / f"{split}.{lang}"]
        path = next((f for f in files if f.exists()), None)
        if path is None:
            raise ConfigError(f"{data_dir}: no {split}.{lang}[.gz] for the accuracy")
        for line in read_lines(path):
            if line.strip():
                total += 1
                right += identify(line) == lang
    return {"split": split, "sentences": total, "accuracy": right / max(total, 1)}


def pivot_row(model: Path, legs: tuple[dict, dict], args, identify, name: str) -> dict:
    """src -> pivot -> tgt with one model, each leg at its row's chosen setting;
    scored on the test split against tgt."""
    from transformer.data import read_pairs
    from transformer.data.download import ensure_corpus
    from transformer.evaluation import score_corpus
    from transformer.inference import Translator

    translator = Translator.load([model], "cpu", args.weights)
    translator.cast(translator.config.decoding.precision)
    first, second = legs
    src, pivot = first["direction"].split("-")
    _, tgt = second["direction"].split("-")
    data = ensure_corpus(translator.config.data.direction(src, tgt))
    pairs = list(read_pairs(data, first["test_split"], 0))
    texts = [s for s, _ in pairs]
    for leg in legs:
        a, b = leg["direction"].split("-")
        dcfg = translator.decoding(
            {"beam_size": leg["beam"], "length_penalty": leg["alpha"]}
        )
        done = translator.translate(texts, dcfg, way=translator.direction(a, b))
        texts = [r[0].text for r in done]
    scores = score_corpus(texts, [t for _, t in pairs])
    print(f"{name}: {first['test_split']}: BLEU {scores['bleu']:.2f}")
    return {
        "row": name,
        "published": False,  # two decodes of the model, not one file's row
        "direction": f"{src}-{tgt}",
        "via": pivot,
        "legs": [
            {"direction": leg["direction"], "beam": leg["beam"], "alpha": leg["alpha"]}
            for leg in legs
        ],
        "test_split": first["test_split"],
        "test": scores,
        "off_target": off_target(texts, tgt, identify),
    }


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--model", required=True, type=Path, help="multilingual")
    parser.add_argument(
        "--bilingual",
        action="append",
        default=[],
        metavar="SRC-TGT=CHECKPOINT",
        help="a bilingual model of one direction, for comparison",
    )
    parser.add_argument("--zero-shot", nargs="*", default=[], metavar="SRC-TGT")
    parser.add_argument("--pivot", default="en", help="the pivot language")
    parser.add_argument("--beams", type=int, nargs="+", default=[5])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw")
    parser.add_argument("--data-dir", help="override data.dir of the checkpoints")
    parser.add_argument("--test-split", help="default: data.test_split")
    parser.add_argument(
        "--note", action="append", default=[], help="KEY=TEXT, kept in the JSON"
    )
    args = parser.parse_args(argv)
    from bench_common import machine

    from transformer.inference import Translator

    if not args.model.is_file():
        raise ConfigError(f"--model {args.model}: no such checkpoint")
    ours = Translator.load([args.model], "cpu", args.weights)
    data = ours.config.data
    if not data.multilingual:
        raise ConfigError(f"--model {args.model}: not a multilingual model")
    identify = language_identifier(data.languages())
    rows = []
    by_direction = {}
    for src, tgt in data.directions():
        way = f"{src}-{tgt}"
        row = score_row(f"multilingual {way}", [[args.model]], args, way)
        row["off_target"] = off_target(row.pop("_hypotheses"), tgt, identify)
        rows.append(row)
        by_direction[way] = row
    for item in args.bilingual:
        way, _, path = item.partition("=")
        if way not in by_direction or not path:
            raise ConfigError(
                f"--bilingual {item}: expected SRC-TGT=CHECKPOINT of a "
                "direction of the model"
            )
        row = score_row(f"bilingual {way}", [[Path(path)]], args, None)
        if row["direction"] != way:
            raise ConfigError(f"--bilingual {item}: it translates {row['direction']}")
        row["published"] = False  # a baseline trained for the comparison only
        target = way.partition("-")[2]
        row["off_target"] = off_target(row.pop("_hypotheses"), target, identify)
        rows.append(row)
    for way in args.zero_shot:
        src, _, tgt = way.partition("-")
        row = score_row(f"zero-shot {way}", [[args.model]], args, way)
        row["off_target"] = off_target(row.pop("_hypotheses"), tgt, identify)
        rows.append(row)
        legs = (
            by_direction.get(f"{src}-{args.pivot}"),
            by_direction.get(f"{args.pivot}-{tgt}"),
        )
        if None in legs:
            raise ConfigError(
                f"--zero-shot {way}: the model has no {src}->"
                f"{args.pivot} and {args.pivot}->{tgt} to pivot"
            )
        rows.append(pivot_row(args.model, legs, args, identify, f"pivot {way}"))
    data_dir = Path(args.data_dir or data.dir)
    result = {
        "selection": "beam and alpha by validation BLEU; test decoded once; a pivot "
        "uses each leg's chosen setting",
        "model": describe(args.model),
        "language_identifier": {
            "library": "py3langid",
            "languages": data.languages(),
            **identifier_accuracy(
                data_dir, data.valid_split, data.languages(), identify
            ),
        },
        "rows": rows,
        "notes": dict(n.partition("=")[::2] for n in args.note),
        "command": shlex.join(
            [
                "python",
                "scripts/multilingual_results.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "machine": machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for row in rows:
        t = row["test"]
        chosen = f"beam {row['beam']} alpha {row['alpha']}" if "beam" in row else "legs"
        print(
            f"| {row['row']} | {t['bleu']:.2f} | {t['chrf']:.2f} | "
            f"{100 * row['off_target']:.1f}% | {chosen} |"
        )
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from transformer.cli.common import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
