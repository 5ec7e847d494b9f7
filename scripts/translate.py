"""Thin wrapper: same as `transformer-translate`."""

import sys

from transformer.cli.translate import translate_main

if __name__ == "__main__":
    sys.exit(translate_main())
