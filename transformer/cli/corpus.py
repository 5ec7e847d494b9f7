"""transformer-translate-corpus: a whole corpus, in resumable chunks, by one or
several worker processes (``transformer.corpus_translation``)."""

from __future__ import annotations

import argparse
import sys

from transformer.cli.common import check_output, run_cli, setup_logging
from transformer.cli.options import (
    add_decoding_args,
    parse_decoding_args,
    search_options,
)
from transformer.config import ConfigError
from transformer.corpus_translation import ChunkError, CorpusJob, translate_corpus


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-translate-corpus",
        description="Translate a corpus file (one sentence a line) in chunks that "
        "are written as they finish; rerunning the command resumes an interrupted "
        "job.",
    )
    add_decoding_args(parser)
    parser.add_argument("--input", "-i", required=True, help="the source file")
    parser.add_argument("--output", "-o", required=True, help="the file to write")
    parser.add_argument(
        "--chunk-lines", type=int, default=2000, help="lines a chunk (default 2000)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes, each with its threads"
    )
    parser.add_argument("--threads", type=int, default=0, help="in all; 0: all cores")
    args = parse_decoding_args(parser, argv)
    check_output(args.output, "--output")
    if args.device not in ("auto", "cpu"):
        raise ConfigError("--device: a corpus job runs on the CPU's worker processes")
    setup_logging()
    from transformer.inference import Translator

    # the search settings, checked once here, before any worker starts
    translator = Translator.load(args.checkpoint, "cpu", args.weights)
    dcfg = translator.decoding(*search_options(args))
    translator.direction(args.src_lang, args.tgt_lang)
    del translator
    job = CorpusJob(
        checkpoints=args.checkpoint,
        decoding=dcfg,
        weights=args.weights,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
        chunk_lines=args.chunk_lines,
        workers=args.workers,
        threads=args.threads,
    )
    try:
        out = translate_corpus(job, args.input, args.output)
    except ChunkError as e:
        print(
            f"error: {e} (finished chunks are kept: rerun to resume)", file=sys.stderr
        )
        return 1
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
