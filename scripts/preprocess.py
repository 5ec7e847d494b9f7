"""Thin wrapper: same as `transformer-preprocess`."""

import sys

from transformer.cli.train import preprocess_main

if __name__ == "__main__":
    sys.exit(preprocess_main())
