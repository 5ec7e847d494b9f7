"""Rewrite checkpoints of weights (``.pt``, e.g. published with ``transformer-average
--weights-only``) as safetensors files, every entry kept: the weights bit for bit,
the config, the tokenizer, the step and what was averaged.

    python scripts/to_safetensors.py models/a.pt models/b.pt  # models/a.safetensors
"""

import argparse
import sys
from pathlib import Path

from transformer.checkpoint import load_checkpoint, save_weights_file
from transformer.cli.common import run_cli
from transformer.safe_checkpoint import SUFFIX


def _convert(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help=".pt files of weights")
    args = parser.parse_args(argv)
    for path in map(Path, args.checkpoints):
        output = path.with_suffix(SUFFIX)
        save_weights_file(load_checkpoint(path), output)
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_convert, None))
