"""Sentences stored back to back in one flat array of ids with one length each:
where a row starts, and gathering rows into a padded batch.

Offsets are not stored: one offset per ``BLOCK`` rows is computed when the arrays
are opened (an offset per row would cost 8 bytes a row), and a row's offset is its
block's plus the lengths before it inside the block.
"""

from __future__ import annotations

import numpy as np

BLOCK = 64  # rows per offset kept in memory


def block_offsets(lengths: np.ndarray) -> np.ndarray:
    """The offset of every ``BLOCK``-th row, and the total: (rows / BLOCK + 1,)."""
    sums = np.add.reduceat(lengths, np.arange(0, len(lengths), BLOCK), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sums)])


def gather(
    ids: np.ndarray, lengths: np.ndarray, blocks: np.ndarray, rows: np.ndarray, pad: int
) -> np.ndarray:
    """Rows ``rows`` of a flat array ``ids`` cut by ``lengths`` (with ``blocks``,
    the offset of every ``BLOCK``-th row) as (B, longest), ``pad`` after each."""
    lens = lengths[rows].astype(np.int64)  # (B,)
    # offset = the block's offset + the lengths before it inside the block
    first = rows - rows % BLOCK
    window = first[:, None] + np.arange(BLOCK - 1)  # (B, 63)
    before = window < rows[:, None]
    inner = np.where(before, lengths[np.minimum(window, len(lengths) - 1)], 0)
    offsets = blocks[rows // BLOCK] + inner.sum(1, dtype=np.int64)
    width = int(lens.max()) if len(lens) else 0
    cols = np.arange(width)
    real = cols[None, :] < lens[:, None]  # (B, W)
    out = np.full((len(rows), width), pad, dtype=np.int64)
    out[real] = ids[(offsets[:, None] + cols[None, :])[real]]
    return out
