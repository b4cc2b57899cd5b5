"""Give freed heap memory back to the operating system, and keep full-size work from
fragmenting the heap.

glibc keeps the pages of freed large temporaries (activations, full-size maps) in its
arenas, so a process's RSS stays at its last peak. Trimming after the warm-up and after
each task brings the idle RSS back down; elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters
# Post-processing a large photo allocates full-size maps and box-sized temporaries of
# 1-32 MB between long-lived allocations (bit masks, the class map); glibc serves them
# from the heap, whose holes then fit the next ones badly: at 24 MP the heap grew by
# 0.1-0.8 GB of free pages, varying from run to run, at 4 MP by 70 B a pixel, and just
# under 4 MP by 27-34 B a pixel (the plan allows 30, tests/test_memory_plan.py). While a
# photo of FULL_RESOLUTION_MIN_PIXELS or more is post-processed, allocations from 1 MB up
# get their own mapping instead, returned to the OS when freed (0.75 GB over idle at
# 24 MP, every run; 15-23 B a pixel from 2.6 to 4 MP). Smaller photos (1080p among them)
# are left as they were: their maps keep reusing heap pages, which saves page faults
# (mapped, 1080p post-processing took ~40 % longer).
FULL_RESOLUTION_MIN_PIXELS = 2_500_000
FULL_RESOLUTION_MMAP_THRESHOLD = 2**20
# Afterwards: where glibc's own adaptive thresholds settle (its ceiling for the mmap
# threshold, twice that for trimming), so the network's temporaries keep reusing heap
# pages as they did (a lower threshold costs the network ~2x page faults)
SETTLED_MMAP_THRESHOLD = 32 * 2**20
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _libc_function(name: str):
    return getattr(_libc(), name, None)


def release_free_memory() -> None:
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


_full_resolution_lock = threading.Lock()
_full_resolution_users = 0


@contextmanager
def full_resolution_heap(pixels: int) -> Iterator[None]:
    """While any thread post-processes a photo of FULL_RESOLUTION_MIN_PIXELS or more,
    allocations from 1 MB up get their own mappings (the setting is process-wide:
    concurrent inferences share it meanwhile)."""
    global _full_resolution_users
    mallopt = _libc_function("mallopt")
    if mallopt is None or pixels < FULL_RESOLUTION_MIN_PIXELS:
        yield
        return
    with _full_resolution_lock:
        _full_resolution_users += 1
        if _full_resolution_users == 1:
            mallopt(M_MMAP_THRESHOLD, FULL_RESOLUTION_MMAP_THRESHOLD)
    try:
        yield
    finally:
        with _full_resolution_lock:
            _full_resolution_users -= 1
            if _full_resolution_users == 0:
                mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
                mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
