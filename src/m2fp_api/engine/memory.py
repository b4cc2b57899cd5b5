"""Give freed heap memory back to the operating system, keep full-size work from
fragmenting the heap, and keep the network's temporaries in it.

glibc keeps the pages of freed large temporaries (activations, full-size maps) in its
arenas, so a process's RSS stays at its last peak. Trimming after the warm-up and after
each task brings the idle RSS back down; elsewhere (no glibc) it does nothing. In
between, how glibc serves large allocations is set per phase (`network_heap`,
`post_processing_heap`).
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
# under 4 MP by 27-40 B a pixel (the plan allows 30, tests/test_memory_plan.py). While a
# photo of FULL_RESOLUTION_MIN_PIXELS or more is post-processed, allocations from 1 MB up
# get their own mapping instead, returned to the OS when freed (0.75 GB over idle at
# 24 MP, every run; 15-23 B a pixel from 2.6 to 4 MP). Smaller photos (1080p among them)
# are left as they were: their maps keep reusing heap pages, which saves page faults
# (mapped, 1080p post-processing took ~40 % longer).
FULL_RESOLUTION_MIN_PIXELS = 2_500_000
FULL_RESOLUTION_MMAP_THRESHOLD = 2**20
# While the network runs, its activations (up to ~60 MB each, the same sizes parse after
# parse, bounded by the network's input size) come from the heap and the heap is not
# trimmed under them; they are given back after the network (release_free_memory). With
# the settled thresholds below, the 1/4-scale maps got mappings of their own and the
# heap's top was trimmed and faulted in again: `exact` took ~2x the page faults (230k a
# parse at 960x540 against 110k) and 5-10 % longer, for ~30 MB less at its peak.
UNTRIMMED_MMAP_THRESHOLD = 256 * 2**20
UNTRIMMED_TRIM_THRESHOLD = 2 * UNTRIMMED_MMAP_THRESHOLD
# Otherwise: where glibc's own adaptive thresholds settle (its ceiling for the mmap
# threshold, twice that for trimming)
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


# threads in each kind of phase; the settings are process-wide, so concurrent tasks share
# them, and full-resolution post-processing (memory first) prevails
_phase_lock = threading.Lock()
_phase_users = {"full_resolution": 0, "untrimmed": 0}


def _apply_thresholds() -> None:
    """With _phase_lock held."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return
    if _phase_users["full_resolution"]:
        mmap, trim = FULL_RESOLUTION_MMAP_THRESHOLD, SETTLED_TRIM_THRESHOLD
    elif _phase_users["untrimmed"]:
        mmap, trim = UNTRIMMED_MMAP_THRESHOLD, UNTRIMMED_TRIM_THRESHOLD
    else:
        mmap, trim = SETTLED_MMAP_THRESHOLD, SETTLED_TRIM_THRESHOLD
    mallopt(M_MMAP_THRESHOLD, mmap)
    mallopt(M_TRIM_THRESHOLD, trim)


@contextmanager
def _phase(name: str) -> Iterator[None]:
    with _phase_lock:
        _phase_users[name] += 1
        _apply_thresholds()
    try:
        yield
    finally:
        with _phase_lock:
            _phase_users[name] -= 1
            _apply_thresholds()


@contextmanager
def network_heap() -> Iterator[None]:
    """While the network runs: its activations from the heap, which is not trimmed."""
    with _phase("untrimmed"):
        yield


@contextmanager
def post_processing_heap(pixels: int) -> Iterator[None]:
    """While any thread post-processes a photo of FULL_RESOLUTION_MIN_PIXELS or more,
    allocations from 1 MB up get their own mappings."""
    if pixels < FULL_RESOLUTION_MIN_PIXELS:
        yield
        return
    with _phase("full_resolution"):
        yield
