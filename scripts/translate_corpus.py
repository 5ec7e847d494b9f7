"""Thin wrapper: same as `transformer-translate-corpus`."""

import sys

from transformer.cli.corpus import main

if __name__ == "__main__":
    sys.exit(main())
