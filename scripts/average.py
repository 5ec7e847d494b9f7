"""Thin wrapper: same as `transformer-average`."""

import sys

from transformer.cli.train import average_main

if __name__ == "__main__":
    sys.exit(average_main())
