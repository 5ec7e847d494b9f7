"""transformer-train, transformer-preprocess and transformer-average."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from transformer.averaging import average_checkpoints
from transformer.checkpoint import WEIGHTS, CheckpointError
from transformer.cli.common import run_cli, setup_logging
from transformer.config import Config, ConfigError, load_config

log = logging.getLogger("transformer")


# --- train ---


def _train(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-train",
        description="Train a Transformer on a parallel corpus.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML file")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from <run_dir>/last.pt (default: training.resume)",
    )
    resume.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start afresh even if <run_dir>/last.pt exists (a folder holding "
        "another run's checkpoints is refused: see --overwrite)",
    )
    resume.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh, first deleting the previous run in <run_dir> "
        "(checkpoints, metrics, its tokenizer; training.overwrite=true)",
    )
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume even though batching settings, world size or corpus changed: "
        "the data position restarts at the next epoch "
        "(training.on_data_change=next_epoch)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. training.max_steps=1000",
    )
    args = parser.parse_args(argv)
    if argv is None:  # the program itself, not a call with arguments (a library's
        # or a test's), and past --help (the reference pages run it in-process)
        from transformer.allocator import without_thread_cache

        without_thread_cache()
    setup_logging()
    from transformer.training import TrainingError, train

    overrides = list(args.overrides)
    if args.overwrite:
        args.resume = False
        overrides += ["training.resume=never", "training.overwrite=true"]
    if args.allow_data_change:
        overrides.append("training.on_data_change=next_epoch")
    cfg = load_config(args.config, overrides)
    try:
        best = train(cfg, args.resume)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(best)
    return 0


def train_main(argv: list[str] | None = None) -> int:
    return run_cli(_train, argv)


# --- preprocess ---


def _preprocess(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-preprocess",
        description="Build the tokenizer and the memory-mapped corpus store of each "
        "training corpus (transformer-train builds them on first use otherwise).",
    )
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides"
    )
    args = parser.parse_args(argv)
    setup_logging()
    from transformer.training.build import run_dir_of
    from transformer.training.runlock import lock_run_dir

    cfg = load_config(args.config, args.overrides)
    run_dir = run_dir_of(cfg)
    lock = lock_run_dir(run_dir)  # it writes the run's tokenizer
    try:
        _build_stores(cfg, run_dir)
    finally:
        lock.release()
    return 0


def _build_stores(cfg: Config, run_dir: Path) -> None:
    """The tokenizer a run in ``run_dir`` would choose, and its corpus stores."""
    from transformer.data.readers import check_split
    from transformer.training.build import build_stores
    from transformer.training.distributed import Distributed
    from transformer.training.start import read_start, with_corpus
    from transformer.training.tokenizer_choice import choose_tokenizer

    cfg = with_corpus(cfg, run_dir)
    check_split(cfg.data, cfg.data.valid_split, "data.valid_split")
    resumed, parent = read_start(cfg, run_dir, resume=None)
    choice = choose_tokenizer(
        cfg, run_dir, Distributed(), resumed, run_dir / "last.pt", parent
    )
    log.info("tokenizer: %s (%s)", choice.why, choice.origin)
    tokenizer = choice.tokenizer
    for store in build_stores(cfg, tokenizer):
        meta, stats = store.meta, store.filter_stats
        tokens = meta["src_tokens"] + meta["tgt_tokens"]
        size = sum(f.stat().st_size for f in store.path.iterdir())
        print(
            f"{store.path}: {meta['source']}: {len(store)} pairs kept, dropped "
            f"{stats.empty} empty, {stats.too_long} over data.max_length, "
            f"{stats.bad_ratio} over data.max_length_ratio; {tokens} tokens, "
            f"{size / max(tokens, 1):.2f} bytes a token"
        )


def preprocess_main(argv: list[str] | None = None) -> int:
    return run_cli(_preprocess, argv)


# --- average ---

_STEP = re.compile(r"step_(\d+)\.pt$")  # what the training loop names them


def _average(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-average",
        description="Average the weights of the last N step checkpoints of a run, "
        "or write one checkpoint's weights alone (to publish a model).",
    )
    parser.add_argument("--run-dir", help="folder with step_<N>.pt checkpoints")
    parser.add_argument("--last", type=int, default=5, help="how many (default 5)")
    parser.add_argument("--inputs", nargs="*", help="explicit checkpoint files")
    parser.add_argument(
        "--output",
        required=True,
        help="the averaged checkpoint: a .safetensors name writes a safetensors "
        "file (no pickle: how models are published), any other a torch.save file",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="raw",
        help="average the trained weights (raw) or their moving average (ema)",
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="one set of weights with the config and tokenizer, nothing else "
        "(an average already holds no optimizer, schedule, RNG or data state)",
    )
    parser.add_argument(
        "--half",
        action="store_true",
        help="store the weights in float16 (loaded back as float32)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.inputs and args.run_dir:
        raise ConfigError("give --run-dir or --inputs, not both")
    if args.last < 1:
        raise ConfigError(f"--last: must be >= 1 (got {args.last})")
    if args.inputs:
        paths = [Path(p) for p in args.inputs]
    elif args.run_dir:
        steps = sorted(
            (p for p in Path(args.run_dir).glob("step_*.pt") if _STEP.match(p.name)),
            key=lambda p: int(_STEP.match(p.name)[1]),
        )
        paths = steps[-args.last :]
    else:
        raise ConfigError("give --run-dir or --inputs")
    if not paths:
        raise CheckpointError(f"no step_*.pt checkpoints in {args.run_dir}")
    if not args.inputs and len(paths) < args.last:
        log.warning(
            "--last %d: %s holds %d step checkpoint(s); averaging those",
            args.last,
            args.run_dir,
            len(paths),
        )
    out = average_checkpoints(
        paths, args.output, args.weights, args.weights_only, args.half
    )
    what = "float16 " if args.half else ""
    what += f"{args.weights} weights" + (" only" if args.weights_only else "")
    print(f"averaged {len(paths)} checkpoints into {out} ({what})")
    return 0


def average_main(argv: list[str] | None = None) -> int:
    return run_cli(_average, argv)
