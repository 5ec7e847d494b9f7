"""The decoding options of ``transformer-eval`` and ``transformer-translate``: their
command-line spelling, and their translation into ``DecodingConfig`` fields (the
rules themselves are ``DecodingConfig.with_options``')."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from transformer.checkpoint import WEIGHTS
from transformer.config import ConfigError, parse_overrides

# flag (argparse dest) -> DecodingConfig field
FLAGS = {
    "beam": "beam_size",
    "top_k": "top_k",
    "top_p": "top_p",
    "temperature": "temperature",
    "seed": "seed",
    "nbest": "nbest",
    "length_penalty": "length_penalty",
    "unk_penalty": "unk_penalty",
    "batch_tokens": "max_tokens",
    "precision": "precision",
}


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    """The checkpoints to load and the search options."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        action="extend",
        help="a checkpoint (.pt, .safetensors, or a transformers MarianMT folder "
        "or Hub name); several (or the option repeated) decode as an ensemble, the "
        "mean of their probabilities",
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
    parser.add_argument(
        "--unk-penalty", type=float, help="subtracted from <unk>'s log-probability"
    )
    parser.add_argument("--nbest", type=int, help="hypotheses per sentence")
    parser.add_argument("--batch-tokens", type=int, help="source tokens per batch")
    parser.add_argument(
        "--src-lang", help="source language (a multilingual model needs both)"
    )
    parser.add_argument("--tgt-lang", help="target language")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        help="weights and activations (int8: CPU, linear layers)",
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


def parse_decoding_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
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


def search_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The search options of a command line as ``DecodingConfig`` fields (the
    flags win over ``decoding.key=value`` overrides), and how each was spelled,
    for ``DecodingConfig.with_options``' errors."""
    options: dict[str, Any] = {}
    spelling = {"sample": "--sample"}
    for key, value in parse_overrides(args.decoding):
        if not key.startswith("decoding."):
            raise ConfigError(
                f"{key}: only decoding.* overrides are accepted here (the "
                "checkpoint fixes the model, data and training settings)"
            )
        name = key.removeprefix("decoding.")
        options[name], spelling[name] = value, f"{key}={{}}"
    for flag, name in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            options[name] = value
            spelling[name] = "--" + flag.replace("_", "-") + " {}"
    if args.sample:
        options["strategy"] = "sample"
    elif args.greedy:
        options["strategy"] = "greedy"
    elif args.beam is not None:
        options["strategy"] = "beam" if args.beam > 1 else "greedy"
    return options, spelling
