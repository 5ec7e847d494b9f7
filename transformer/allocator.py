"""Keeping freed memory for reuse on CPU (glibc's ``malloc``).

A training step allocates the same large tensors every time (the logits and their
gradient alone are B * T * V floats, over 100 MB for a 4,096-token batch and an
8k vocabulary). glibc serves blocks above its mmap threshold (at most 32 MB) with a
fresh ``mmap`` and unmaps them on free, so every step pays the kernel's page faults
again on each of those pages, a large share of a step's time in a VM (the README's
profile of a training step, ``benchmarks/train.json``). Telling glibc never to mmap
and never to return the top of the heap makes a freed block the next step's block,
with its pages already mapped. The process keeps its peak memory for its lifetime,
which is what a training run does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_done = False


def reuse_freed_memory() -> bool:
    """Make freed heap memory stay mapped for reuse (glibc only; a no-op
    elsewhere). Returns whether the setting took effect. Idempotent."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int, so 2 GiB - 1.
    # One arena: a thread's own arena is made of 64 MiB mmapped heaps, so its
    # larger blocks would still be mapped afresh.
    ok = (
        mallopt(M_ARENA_MAX, 1) == 1
        and mallopt(M_MMAP_MAX, 0) == 1
        and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    )
    if ok:
        log.debug("malloc: large blocks from the heap, freed memory kept for reuse")
    _done = ok
    return ok
