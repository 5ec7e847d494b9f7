"""transformer-eval, and the decoding options it shares with transformer-translate
(``cli/translate.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch

from transformer.checkpoint import (
    WEIGHTS,
    load_ensemble,
    set_precision,
)
from transformer.cli import run_cli, setup_logging
from transformer.config import ConfigError, DecodingConfig, parse_overrides
from transformer.data import read_pairs
from transformer.files import atomic_write_bytes
from transformer.search import check_min_len

log = logging.getLogger("transformer")


# --- shared decoding options ---


def _add_decoding_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        action="extend",
        help="a .pt checkpoint; several (or the option repeated) decode as an "
        "ensemble, the mean of their probabilities",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="raw",
        help="raw: the trained weights; ema: their moving average (training.ema_decay)",
    )
    search = parser.add_mutually_exclusive_group()
    search.add_argument("--beam", type=int, help="beam size (beam search)")
    search.add_argument("--greedy", action="store_true", help="greedy decoding")
    search.add_argument("--sample", action="store_true", help="sample instead")
    parser.add_argument("--top-k", type=int, help="sample from the k best tokens")
    parser.add_argument("--top-p", type=float, help="sample from the nucleus p")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--length-penalty", type=float, help="GNMT alpha")
    parser.add_argument("--nbest", type=int, help="hypotheses per sentence")
    parser.add_argument("--batch-tokens", type=int, help="source tokens per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], help="weights and activations"
    )
    parser.add_argument(
        "decoding",
        nargs="*",
        metavar="decoding.key=value",
        default=[],
        help="other decoding overrides",
    )


_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")
_BARE_KEY = re.compile(r"decoding(\.\w+)+$")  # an override missing its "=value"


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse, then hand back the ``decoding.key=value`` overrides that followed
    ``--checkpoint`` (which takes several values) to the overrides."""
    args = parser.parse_args(argv)
    overrides = [
        c for c in args.checkpoint if _OVERRIDE.match(c) and not Path(c).exists()
    ]
    args.checkpoint = [c for c in args.checkpoint if c not in overrides]
    args.decoding = overrides + args.decoding
    if not args.checkpoint:
        parser.error("--checkpoint needs a checkpoint file")
    for item in [*args.checkpoint, *args.decoding]:
        if _BARE_KEY.match(item) and not Path(item).exists():
            parser.error(f"{item}: expected decoding.key=value")
    return args


_SAMPLING = ("top_k", "top_p", "temperature", "seed")


def _decoding_config(args, base: DecodingConfig) -> DecodingConfig:
    from transformer.config import _build

    values = vars(base).copy()
    overridden = set()
    for key, value in parse_overrides(args.decoding):
        if not key.startswith("decoding."):
            raise ConfigError(
                f"{key}: only decoding.* overrides are accepted here (the "
                "checkpoint fixes the model, data and training settings)"
            )
        name = key.removeprefix("decoding.")
        values[name] = value
        overridden.add(name)
    if args.sample:
        values["strategy"] = "sample"
    elif args.greedy:
        values["strategy"] = "greedy"
    elif args.beam:
        values["strategy"] = "beam" if args.beam > 1 else "greedy"
    mapping = {
        "beam": "beam_size",
        "top_k": "top_k",
        "top_p": "top_p",
        "temperature": "temperature",
        "seed": "seed",
        "nbest": "nbest",
        "length_penalty": "length_penalty",
        "batch_tokens": "max_tokens",
        "precision": "precision",
    }
    for arg, key in mapping.items():
        if getattr(args, arg) is not None:
            values[key] = getattr(args, arg)
    given = [a for a in _SAMPLING if getattr(args, a) is not None]
    if given and values["strategy"] != "sample":
        options = ", ".join("--" + a.replace("_", "-") for a in given)
        raise ConfigError(
            f"{options}: for sampling only (add --sample); this decodes with "
            f"{values['strategy']} search"
        )
    cfg = _build(DecodingConfig, values, "decoding")
    # --nbest / --beam, or else decoding.nbest= / decoding.beam_size=, count as asked
    nbest, beam, names = args.nbest, args.beam, ["--nbest {}", "--beam {}"]
    if nbest is None and "nbest" in overridden:
        nbest, names[0] = cfg.nbest, "decoding.nbest={}"
    if beam is None and "beam_size" in overridden:
        beam, names[1] = cfg.beam_size, "decoding.beam_size={}"
    cfg.settle_nbest(nbest, beam, (names[0], names[1]))
    cfg.validate()
    return cfg


def _device(name: str) -> torch.device:
    from transformer.training import resolve_device

    return resolve_device(name, "--device")


def _check_output(path: str | None, option: str) -> None:
    """A file to write after decoding: refuse a bad path before the work."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {path}: is a directory")
    if not target.parent.is_dir():
        raise ConfigError(f"{option} {path}: no such directory {target.parent}")


def _check_decoding(dcfg: DecodingConfig, model, checkpoints: list[str]) -> None:
    """Decoding settings each checkpoint's model (alone or in an ensemble) refuses,
    refused as the config refuses them, naming the checkpoint: ``decoding.compile``
    for an architecture that cannot compile, a ``decoding.min_len`` no output of the
    model can reach."""
    members = getattr(model, "models", [model])
    for path, member in zip(checkpoints, members, strict=True):
        refusal = member.cfg.compile_refusal()
        if dcfg.compile and refusal is not None:
            raise ConfigError(
                f"decoding.compile: true is not supported for {path} "
                f"(model.arch: {member.cfg.arch}: {refusal})"
            )
        check_min_len(dcfg.min_len, member.cfg.max_positions, path)


# --- eval ---


def _eval(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-eval",
        description="Translate a test set with a checkpoint; score it with sacreBLEU.",
    )
    _add_decoding_args(parser)
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
    args = _parse(parser, argv)
    _check_output(args.output, "--output")
    _check_output(args.report, "--report")
    setup_logging()
    from transformer.evaluation import reference_warnings, score_corpus, translate

    device = _device(args.device)
    model, cfg, tokenizer, infos = load_ensemble(args.checkpoint, device, args.weights)
    dcfg = _decoding_config(args, cfg.decoding)
    _check_decoding(dcfg, model, args.checkpoint)
    set_precision(model, dcfg.precision)
    if args.src or args.ref:
        if not (args.src and args.ref):
            raise ConfigError("--src and --ref go together")
        from transformer.data import read_text_pairs

        pairs = list(read_text_pairs(Path(args.src), Path(args.ref)))
        name = Path(args.src).name
    else:
        if args.data_dir:
            cfg.data.dir = args.data_dir
        split = args.split or cfg.data.test_split
        if not split:
            raise ConfigError("no --split given and the config has no data.test_split")
        from transformer.data.download import ensure_corpus

        ensure_corpus(cfg.data)
        pairs = list(read_pairs(cfg.data, split, cfg.training.seed))
        name = split
    if not pairs:
        raise ConfigError(f"{name}: holds no sentence pairs to evaluate")
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    for warning in reference_warnings(references):
        log.warning(warning)
    start = time.perf_counter()
    results = translate(
        model,
        tokenizer,
        sources,
        dcfg,
        device,
        use_cache=not args.no_cache,
        progress=True,
    )
    seconds = time.perf_counter() - start
    hyps = [r[0].text for r in results]
    scores = score_corpus(hyps, references, ter=args.ter)
    # an ensemble's or the EMA's hypotheses do not overwrite the first model's
    tag = ".ema" if args.weights == "ema" else ""
    tag += f".ens{len(infos)}" if len(infos) > 1 else ""
    default = Path(args.checkpoint[0]).with_suffix(f"{tag}.{name}.hyp")
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
