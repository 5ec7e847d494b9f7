"""transformer-eval: translate a test set with a checkpoint (or an ensemble) and
score it with sacreBLEU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from transformer.cli.common import check_output, run_cli, setup_logging
from transformer.cli.options import (
    add_decoding_args,
    parse_decoding_args,
    search_options,
)
from transformer.config import ConfigError
from transformer.data import read_pairs
from transformer.files import atomic_write_bytes
from transformer.inference import Translator

log = logging.getLogger("transformer")


def _eval(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-eval",
        description="Translate a test set with a checkpoint; score it with sacreBLEU.",
    )
    add_decoding_args(parser)
    parser.add_argument(
        "--split", help="a split of the checkpoint's corpus (default: data.test_split)"
    )
    parser.add_argument("--src", help="source file (with --ref) instead of a split")
    parser.add_argument("--ref", help="reference file")
    parser.add_argument("--data-dir", help="override data.dir of the checkpoint")
    parser.add_argument(
        "--output", help="hypothesis file (default: next to checkpoint)"
    )
    parser.add_argument("--report", help="JSON report (default: <output>.json)")
    parser.add_argument("--ter", action="store_true", help="also compute TER")
    args = parse_decoding_args(parser, argv)
    check_output(args.output, "--output")
    check_output(args.report, "--report")
    setup_logging()
    from transformer.evaluation import reference_warnings, score_corpus

    translator = Translator.load(args.checkpoint, args.device, args.weights)
    cfg, infos, device = translator.config, translator.infos, translator.device
    dcfg = translator.decoding(*search_options(args))
    way = translator.direction(args.src_lang, args.tgt_lang)
    translator.cast(dcfg.precision)
    if args.src or args.ref:
        if not (args.src and args.ref):
            raise ConfigError("--src and --ref go together")
        from transformer.data import read_text_pairs

        pairs = list(read_text_pairs(Path(args.src), Path(args.ref)))
        name = Path(args.src).name
    else:
        data = cfg.data
        if translator.multilingual:  # the split's files of this direction
            data = data.direction(way.src, way.tgt)
        if args.data_dir:
            data = dataclasses.replace(data, dir=args.data_dir)
        split = args.split or data.test_split
        if not split:
            raise ConfigError("no --split given and the config has no data.test_split")
        from transformer.data.download import ensure_corpus

        data = ensure_corpus(data)
        pairs = list(read_pairs(data, split, cfg.training.seed))
        name = split
    if not pairs:
        raise ConfigError(f"{name}: holds no sentence pairs to evaluate")
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    for warning in reference_warnings(references):
        log.warning(warning)
    start = time.perf_counter()
    results = translator.translate(
        sources, dcfg, use_cache=not args.no_cache, progress=True, way=way
    )
    seconds = time.perf_counter() - start
    hyps = [r[0].text for r in results]
    scores = score_corpus(hyps, references, ter=args.ter)
    # an ensemble's or the EMA's hypotheses do not overwrite the first model's
    tag = ".ema" if args.weights == "ema" else ""
    tag += f".ens{len(infos)}" if len(infos) > 1 else ""
    tag += f".{way.name}" if translator.multilingual else ""
    first = Path(args.checkpoint[0])
    if not first.exists():  # a Hub name: the hypotheses go to this folder
        first = Path(first.name)
    default = first.with_suffix(f"{tag}.{name}.hyp")
    output = Path(args.output or default)
    atomic_write_bytes(output, ("\n".join(hyps) + "\n").encode("utf-8"))
    first = infos[0]
    report = {
        "checkpoint": first["checkpoint"],
        "step": first.get("step"),
        **{k: first[k] for k in ("averaged_from", "averaged_steps") if k in first},
        **({"ensemble": infos} if len(infos) > 1 else {}),
        "weights": args.weights,
        "data": name,
        "direction": way.name,
        "sentences": len(hyps),
        "decoding": vars(dcfg),
        "scores": scores,
        "seconds": seconds,
        "sentences_per_s": len(hyps) / seconds,
        "device": str(device),
        "hypotheses": str(output),
    }
    report_path = Path(args.report or output.with_suffix(output.suffix + ".json"))
    atomic_write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode())
    print(f"BLEU {scores['bleu']:.2f}  {scores['bleu_signature']}")
    print(f"BLEU {scores['bleu_lc']:.2f}  {scores['bleu_lc_signature']} (lowercased)")
    print(f"chrF {scores['chrf']:.2f}  {scores['chrf_signature']}")
    if "ter" in scores:
        print(f"TER  {scores['ter']:.2f}  {scores['ter_signature']}")
    print(f"hypotheses: {output}\nreport: {report_path}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    return run_cli(_eval, argv)
