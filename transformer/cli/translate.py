"""transformer-translate: sentences from arguments, a file or standard input;
plain text, or JSON lines with per-sentence controls (``--jsonl``)."""

from __future__ import annotations

import argparse
import json
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
from transformer.controls import ControlError, Controls
from transformer.data import DataError, read_lines
from transformer.inference import Outcome, Translator

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


def _jsonl_request(line: str) -> tuple[str, Controls | None]:
    """A ``--jsonl`` input line -> its source and controls; ControlError names
    what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ControlError(f"not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ControlError("expected a JSON object with a src key")
    src = obj.get("src")
    if not isinstance(src, str):
        got = "no src key" if src is None else f"src is a {type(src).__name__}"
        raise ControlError(f"{got}: expected a string")
    controls = Controls.from_dict(obj, ignore=("src",))
    return src, None if controls.empty else controls


def _json_result(outcome: Outcome, alignment: bool, nbest: bool) -> dict:
    """One output line of ``--jsonl``."""
    if outcome.error is not None:
        return {"error": outcome.error, "warnings": outcome.warnings}
    hyps = outcome.translations

    def entry(h) -> dict:
        out = {"text": h.text, "score": h.score}
        if alignment:
            out["alignment"] = h.alignment or ""
        return out

    best = entry(hyps[0]) if hyps else {"text": "", "score": 0.0}
    if alignment and not hyps:
        best["alignment"] = ""
    result = {**best, "warnings": outcome.warnings}
    if nbest:
        result["nbest"] = [entry(h) for h in hyps]
    return result


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
    controls = parser.add_argument_group(
        "controls (docs: Evaluate and translate, Controls)"
    )
    controls.add_argument(
        "--jsonl",
        action="store_true",
        help='input lines are JSON objects {"src": ..., "prefix": ..., '
        '"constraints": [...], "forbid": [...]}; output lines are JSON objects',
    )
    controls.add_argument(
        "--prefix",
        help="every output starts with this text (a trailing space ends its last word)",
    )
    controls.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="PHRASE",
        help="every output contains PHRASE (repeatable; beam search)",
    )
    controls.add_argument(
        "--forbid",
        action="append",
        default=[],
        metavar="PHRASE",
        help="no output contains PHRASE (repeatable)",
    )
    controls.add_argument(
        "--alignment",
        action="store_true",
        help="add word alignments (Pharaoh i-j) from the attention",
    )
    controls.add_argument(
        "--alignment-layer",
        type=int,
        default=-1,
        metavar="N",
        help="the decoder layer whose attention aligns (default -1, the last)",
    )
    args = parse_decoding_args(parser, argv)
    if args.attention and len(args.checkpoint) > 1:
        raise ConfigError("--attention plots one model: give one --checkpoint")
    if args.attention and args.jsonl:
        raise ConfigError("--attention plots a plain sentence: not with --jsonl")
    common = Controls(args.prefix or "", tuple(args.constraint), tuple(args.forbid))
    for key, phrases in (("--constraint", args.constraint), ("--forbid", args.forbid)):
        if any(not p.strip() for p in phrases):
            raise ConfigError(f"{key}: an empty phrase")
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
    if args.alignment:
        translator.check_alignment(args.alignment_layer)
    if common.constraints and dcfg.strategy != "beam":
        raise ConfigError(
            f"--constraint: needs beam search (--beam K), not {dcfg.strategy}"
        )
    controlled = args.jsonl or args.alignment or not common.empty
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

    def emit_controlled(batch: list[str]) -> None:
        """Translate a batch with controls or alignments; plain or JSON lines."""
        nonlocal done_lines
        requests: dict[int, tuple[str, Controls | None]] = {}
        outcomes: dict[int, Outcome] = {}
        for i, line in enumerate(batch):
            if not line.strip():
                continue
            try:
                src, own = _jsonl_request(line) if args.jsonl else (line, None)
            except ControlError as e:
                outcomes[i] = Outcome(error=str(e))
                continue
            if src.strip():
                mine = common.merged(own) if own is not None else common
                requests[i] = (src, None if mine.empty else mine)
            else:
                outcomes[i] = Outcome()
        todo = list(requests)
        done = translator.translate_controlled(
            [requests[i][0] for i in todo],
            dcfg,
            [requests[i][1] for i in todo],
            args.alignment_layer if args.alignment else None,
            way,
            use_cache=use_cache,
        )
        outcomes.update(zip(todo, done, strict=True))
        for i in range(len(batch)):
            outcome = outcomes.get(i, Outcome())
            number = done_lines + i + 1
            if outcome.error is not None:
                log.warning("line %d: refused: %s", number, outcome.error)
            for warning in outcome.warnings:
                log.warning("line %d: %s", number, warning)
            if args.jsonl:
                result = _json_result(outcome, args.alignment, dcfg.nbest > 1)
                print(json.dumps(result, ensure_ascii=False))
                continue
            hyps = outcome.translations or [None]
            for h in hyps if dcfg.nbest > 1 else hyps[:1]:
                text = _one_line(h.text) if h else ""
                fields = [text] + (
                    [h.alignment or "" if h else ""] if args.alignment else []
                )
                if dcfg.nbest > 1:
                    fields = [str(number - 1), f"{h.score if h else 0.0:.4f}", *fields]
                print("\t".join(fields))
        sys.stdout.flush()
        done_lines += len(batch)

    def emit(batch: list[str]) -> None:
        nonlocal done_lines
        if controlled:
            emit_controlled(batch)
            return
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
