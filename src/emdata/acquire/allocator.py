"""glibc malloc settings for the stages that stream volumes: freed shard buffers go back to the system.

Measured (bench/bench_memory.py, bench/README.md): with glibc's defaults a stage's anonymous memory grows with
the number of shards it writes, although Python holds a bounded amount (tracemalloc: 24-35 MB over the source
for 20 to 45 shards). Two defaults cause it: the dynamic mmap threshold (after the first large buffer is freed,
buffers up to 32 MiB, i.e. whole shards, come from the heap, whose free space fragments and stays resident) and
up to 8 arenas per core (each tensorstore and zarr thread keeps its own heap). A fixed threshold of 1 MiB and two
arenas keep the growth away. They cost time where a stage allocates large buffers often: the hemibrain stage
(512^3 crop with segmentation) took 4.11 s wall / 6.43 s CPU with them vs 3.67 s / 5.63 s without (interleaved,
4 rounds, 2026-11-26; its tensorstore copy slowed alike). ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_``
in the environment win (a user's own setting is left alone). Called once at the start of a stage process
(``emdata.stage.main``, the metadata stage's ``main``); library calls from a user's own process leave its
allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1 << 20
ARENA_MAX = 2
_done = False


def bound_malloc() -> bool:
    """Apply the settings once per process (glibc only; elsewhere nothing happens); True if they were applied."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator, its defaults
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = []
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        applied.append(f"mmap threshold {MMAP_THRESHOLD_BYTES} bytes")
    if "MALLOC_ARENA_MAX" not in os.environ and mallopt(M_ARENA_MAX, ARENA_MAX):
        applied.append(f"{ARENA_MAX} arenas")
    _done = True
    log.debug("malloc: %s", ", ".join(applied) or "left as set in the environment")
    return True
