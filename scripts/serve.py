"""Thin wrapper: same as `transformer-serve`."""

import sys

from transformer.serve import main

if __name__ == "__main__":
    sys.exit(main())
