"""Thin wrapper: same as `transformer-eval`."""

import sys

from transformer.cli.evaluate import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
