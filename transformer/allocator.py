"""A CPU training or decoding process's memory: freed blocks kept for reuse
(glibc's ``malloc``) and bf16 kernel caches of bounded size
(``bound_kernel_caches``, training).

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
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_done = False


def reuse_freed_memory(single_arena: bool = True) -> bool:
    """Make freed heap memory stay mapped for reuse (glibc only; a no-op
    elsewhere). Returns whether the setting took effect. Idempotent: the first
    call's setting holds.

    ``single_arena`` (training): one malloc arena, since a thread's own arena
    is made of 64 MiB mmapped heaps whose larger blocks would still be mapped
    afresh. A decoding process (``Translator.load``) passes False: there the
    step's large blocks (the cache's keys and values, the logits) come from the
    main thread, and one arena for every thread made a bf16 beam search slower,
    while the two other settings alone made it faster (the benchmarks page,
    decoding on the CPU with AMX).
    """
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
    # mallopt returns 1 on success; the trim threshold is an int, so 2 GiB - 1
    ok = (
        (not single_arena or mallopt(M_ARENA_MAX, 1) == 1)
        and mallopt(M_MMAP_MAX, 0) == 1
        and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    )
    if ok:
        log.debug("malloc: large blocks from the heap, freed memory kept for reuse")
    _done = ok
    return ok


# oneDNN's kernels for one matrix-product shape, kept per shape by two LRU caches:
# ideep's (LRU_CACHE_CAPACITY) and oneDNN's own (ONEDNN_PRIMITIVE_CACHE_CAPACITY),
# 1,024 entries each by default. The bounds a training process sets: oneDNN's
# cache is the one a product's kernel is found in (ideep asks it at every call)
KERNEL_CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
KERNEL_CACHE_ENTRIES = {
    "LRU_CACHE_CAPACITY": 64,
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": 192,
}


#: glibc's per-thread cache of small freed blocks, off (``without_thread_cache``)
THREAD_CACHE_OFF = "glibc.malloc.tcache_count=0"


def without_thread_cache() -> None:
    """Run this program again, in place (``exec``: same process id, interpreter
    and command line), with glibc's per-thread cache of small freed blocks off,
    unless ``GLIBC_TUNABLES`` is set already (the user's settings, or this call's
    own after the ``exec``) or the C library is not glibc. Call it from a
    program's entry point (``transformer-train`` does, once its arguments are
    parsed), never from a library call, before anything starts threads, writes
    output or reads input that the ``exec`` would lose or repeat.

    glibc keeps a few freed blocks of each small size per thread for reuse
    without coalescing them with their free neighbours. With training's heap
    settings (``reuse_freed_memory``) those small blocks sit between the step's
    large ones, whose sizes change with every batch, and split the free space:
    in 120 bf16 updates of the benchmark model the heap grew to 1.45-1.65 GiB with
    the cache and 1.08-1.12 without, float32's to 1.33 and 1.19-1.21, at the same
    speed (the benchmarks page). The tunable is read only when a process starts,
    hence the ``exec``.
    """
    import platform

    if "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux"):
        return
    if platform.libc_ver()[0] != "glibc":
        return
    env = {**os.environ, "GLIBC_TUNABLES": THREAD_CACHE_OFF}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:  # no interpreter to run again: go on with the cache
        log.debug("could not run again without glibc's thread cache: %s", e)


def bound_kernel_caches(entries: int | None = None) -> dict[str, str]:
    """Cap the kernel caches of CPU bf16 matrix products (oneDNN, through ideep)
    at ``entries`` shapes each (``KERNEL_CACHE_ENTRIES`` when None), unless the
    environment already sets them.

    A bf16 product on CPU runs a oneDNN kernel generated and cached for its exact
    shape, about 1 MB each. Before the linear layers' row buckets
    (``transformer.linear``), each training step added some 30-40 new shapes, and
    with the libraries' 1,024-entry caches a bf16 run's memory grew by 1.3 GiB
    over its first 150 updates (2.8 GiB against float32's 1.5; float32 products
    use MKL, which keeps no kernels). With the buckets the linear layers' products
    come in a bounded set of shapes, 40-70 in a step and more across the ten or
    so body sizes that batches of one token budget meet (about 110 in all);
    attention's batched products bring a few new shapes a step, so the cache is
    always full. 192 entries in oneDNN's cache keep most of the linear layers'
    kernels from one use of a body size to the next (about 3 ms a step more of
    kernel builds than with 256, some 1% of a bf16 step; 64 entries cost 16 ms
    more), and bound the memory: each entry about 1 MB, 192 entries 66 MiB less
    at bf16's peak than 256 (the benchmarks page). Both libraries read these
    variables when they first build a kernel: call this before the first bf16
    product. Returns the settings in force.
    """
    for name in KERNEL_CACHES:
        bound = KERNEL_CACHE_ENTRIES[name] if entries is None else entries
        os.environ.setdefault(name, str(bound))
    return {name: os.environ[name] for name in KERNEL_CACHES}
