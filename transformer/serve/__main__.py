"""``python -m transformer.serve``: the same as ``transformer-serve``."""

import sys

from transformer.serve import main

sys.exit(main())
