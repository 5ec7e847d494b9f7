"""Thin wrapper: same as `transformer-train`."""

import sys

from transformer.cli.train import train_main

if __name__ == "__main__":
    sys.exit(train_main())
