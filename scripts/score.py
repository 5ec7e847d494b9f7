"""Thin wrapper: same as `transformer-score`."""

import sys

from transformer.cli.score import score_main

if __name__ == "__main__":
    sys.exit(score_main())
