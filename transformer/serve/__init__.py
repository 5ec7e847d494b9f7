"""Translation server: a LibreTranslate-style JSON API, dynamic batching, a web page.

    transformer-serve --checkpoint checkpoints/multi30k_de_en/best.pt --port 8080

Each checkpoint serves the language pair of its config (``data.src_lang`` ->
``data.tgt_lang``). Requests that arrive within ``max_wait_ms`` of each other and ask
for the same pair and search are decoded as one batch, under a token budget, by one
background thread that owns the models, so the event loop is never blocked.

FastAPI and uvicorn are the ``serve`` extra (``pip install -e ".[serve]"``); they are
imported inside the functions that need them, so ``import transformer`` never does.
"""

import argparse
import dataclasses
import logging
import sys

import torch

from transformer.checkpoint import WEIGHTS, CheckpointError
from transformer.config import ConfigError
from transformer.loading import resolve_device
from transformer.serve.app import ApiError, create_app
from transformer.serve.batching import Batcher, Job, QueueFull
from transformer.serve.models import (
    EXTRA_MISSING,
    LoadedModel,
    ServeConfig,
    load_models,
    search_settings,
)
from transformer.tokenizer import TokenizerError

__all__ = [
    "ApiError",
    "Batcher",
    "Job",
    "LoadedModel",
    "QueueFull",
    "ServeConfig",
    "create_app",
    "load_models",
    "main",
    "parse_args",
    "search_settings",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(
        prog="transformer-serve",
        description="Serve checkpoints over HTTP: JSON API, web page at /, "
        "API docs at /docs.",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a checkpoint (.pt, .safetensors, or a transformers MarianMT folder or "
        "Hub name); repeat for more language pairs",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="raw",
        help="raw: the trained weights; ema: their moving average (training.ema_decay)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="default 8080")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0: all")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        help="weights and activations (default: the checkpoint's decoding.precision)",
    )
    for f in dataclasses.fields(ServeConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"default {getattr(defaults, f.name)}",
        )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: must be in [0, 65535] (got {args.port})")
    if args.threads < 0:
        parser.error(f"--threads: must be >= 0 (got {args.threads})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        import uvicorn
    except ImportError:
        print(f"error: {EXTRA_MISSING}", file=sys.stderr)
        return 2
    limits = ServeConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    )
    try:
        limits.validate()
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device, "--device")
        models = load_models(args.checkpoint, device, args.precision, args.weights)
        app = create_app(models, limits)
    except (ConfigError, CheckpointError, TokenizerError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
