"""What every command shares: the one-line user errors and exit statuses
(``run_cli``), logging, and a check of output paths before the work."""

from __future__ import annotations

import logging
import os
import select
import sys
from pathlib import Path

from transformer.checkpoint import CheckpointError
from transformer.config import ConfigError
from transformer.data import DataError
from transformer.tokenizer import TokenizerError

log = logging.getLogger("transformer")
USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_cli(main, argv, extra_errors: tuple[type[Exception], ...] = ()) -> int:
    """Run an entry point: a user error prints one ``error:`` line (exit 2), Ctrl-C
    prints ``interrupted`` (exit 130), a closed output pipe stops quietly (exit
    141, as SIGPIPE would), an operating-system error on a named file (read-only,
    not a folder, disk full) prints one line (exit 2); anything else is a bug and
    shows its trace."""
    try:
        return main(argv)
    except (*USER_ERRORS, *extra_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a socket, a subprocess): a real error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except OSError as e:  # a folder that is a file, read-only, a full disk
        if e.filename is None:
            raise
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2


def _stdout_closed() -> bool:
    """Has the reader of standard output left (``| head``)? The write end of a
    pipe whose reader closed it polls as an error."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor, no poll
        return False


def check_output(path: str | None, option: str) -> None:
    """A file to write after the work: refuse a bad path before it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {path}: is a directory")
    if not target.parent.is_dir():
        raise ConfigError(f"{option} {path}: no such directory {target.parent}")
