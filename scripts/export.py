"""Thin wrapper: same as `transformer-export`."""

import sys

from transformer.export import main

if __name__ == "__main__":
    sys.exit(main())
