"""transformer-translate: sentences from arguments, a file or standard input."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from transformer.cli.common import check_output, run_cli, setup_logging
from transformer.cli.options import (
    add_decoding_args,
    parse_decoding_args,
    search_options,
)
from transformer.config import ConfigError
from transformer.data import DataError, read_lines
from transformer.inference import Translator

log = logging.getLogger("transformer")


def _input_lines(args) -> list[str] | None:
    """Sentences from arguments or a file; None means: stream standard input."""
    if args.sentences and args.input:
        raise ConfigError("give sentences (-s) or an --input file, not both")
    if args.sentences:
        for number, sentence in enumerate(args.sentences, start=1):
            try:  # the shell passes undecodable bytes as lone surrogates
                sentence.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(
                    f"--sentence #{number}: not valid UTF-8 (pass text, or a file "
                    "with --input and --replace-invalid)"
                ) from None
        return args.sentences
    if args.input:
        hint = (
            "" if args.replace_invalid else "; pass --replace-invalid to replace them"
        )
        return list(read_lines(Path(args.input), args.replace_invalid, hint))
    return None


# str.splitlines() breaks at these besides \n: a translation holding one (copied
# from its source) would print as several lines
_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\v\f\x1c\x1d\x1e\x85\u2028\u2029", " "))


def _one_line(text: str) -> str:
    return text.translate(_LINE_BREAKS)


def _stdin_lines(replace_invalid: bool):
    """Decode standard input line by line, naming the line of invalid UTF-8."""
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            if not replace_invalid:
                raise DataError(
                    f"<stdin>:{number}: not valid UTF-8 (byte {raw[e.start]:#04x} "
                    f"at column {e.start + 1}); pass --replace-invalid to replace them"
                ) from None
            log.warning("<stdin>:%d: invalid UTF-8 replaced", number)
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


def _translate(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="transformer-translate",
        description="Translate sentences (arguments, --input file or standard input).",
    )
    add_decoding_args(parser)
    parser.add_argument(
        "--sentence",
        "-s",
        dest="sentences",
        action="append",
        help="a sentence to translate (repeatable)",
    )
    parser.add_argument("--input", "-i", help="file with one sentence a line")
    parser.add_argument(
        "--batch-lines",
        type=int,
        default=64,
        help="lines per batch when streaming standard input",
    )
    parser.add_argument(
        "--replace-invalid",
        action="store_true",
        help="replace invalid UTF-8 with U+FFFD instead of failing",
    )
    parser.add_argument(
        "--attention",
        metavar="PATH.png",
        help="plot the cross-attention of the first sentence",
    )
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer to plot")
    parser.add_argument("--head", type=int, help="head to plot (default: the mean)")
    args = parse_decoding_args(parser, argv)
    if args.attention and len(args.checkpoint) > 1:
        raise ConfigError("--attention plots one model: give one --checkpoint")
    if args.batch_lines < 1:
        raise ConfigError(f"--batch-lines: must be >= 1 (got {args.batch_lines})")
    check_output(args.attention, "--attention")
    setup_logging()
    lines = _input_lines(args)
    if args.attention and not (lines and lines[0].strip()):
        raise ConfigError("--attention needs a sentence (-s) or --input file")
    translator = Translator.load(args.checkpoint, args.device, args.weights)
    dcfg = translator.decoding(*search_options(args))
    way = translator.direction(args.src_lang, args.tgt_lang)
    translator.cast(dcfg.precision)
    use_cache = not args.no_cache
    if args.attention:  # first: a bad --layer or --head fails before the work
        from transformer.plots import plot_attention

        path = plot_attention(
            translator.model,
            translator.tokenizer,
            lines[0],
            dcfg,
            translator.device,
            args.attention,
            layer=args.layer,
            head=args.head,
            way=way,
        )
        print(f"attention plot: {path}", file=sys.stderr)
    done_lines = 0  # lines of the input written so far: n-best rows count from 0

    def emit(batch: list[str]) -> None:
        nonlocal done_lines
        todo = [i for i, line in enumerate(batch) if line.strip()]
        done = translator.translate(
            [batch[i] for i in todo],
            dcfg,
            use_cache=use_cache,
            line_numbers=[done_lines + i + 1 for i in todo],
            way=way,
        )
        results = dict(zip(todo, done, strict=True))
        for i in range(len(batch)):
            hyps = results.get(i)
            if dcfg.nbest > 1:  # an empty line gives one empty hypothesis
                for h in hyps or [None]:
                    score, text = (h.score, h.text) if h else (0.0, "")
                    print(f"{done_lines + i}\t{score:.4f}\t{_one_line(text)}")
            elif not hyps:
                print("")  # an empty line gives an empty line
            else:
                print(_one_line(hyps[0].text))
        sys.stdout.flush()
        done_lines += len(batch)

    if lines is not None:
        emit(lines)
    elif sys.stdin.isatty():
        print("Type a sentence and press Enter (Ctrl-D to quit).", file=sys.stderr)
        for line in _stdin_lines(args.replace_invalid):
            emit([line])
    else:
        batch: list[str] = []
        for line in _stdin_lines(args.replace_invalid):
            batch.append(line)
            if len(batch) >= args.batch_lines:
                emit(batch)
                batch = []
        if batch:
            emit(batch)
    return 0


def translate_main(argv: list[str] | None = None) -> int:
    return run_cli(_translate, argv)
