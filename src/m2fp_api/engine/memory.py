"""Give freed heap memory back to the operating system, and keep full-size work from
fragmenting the heap.

glibc keeps the pages of freed large temporaries (activations, full-size maps) in its
arenas, so a process's RSS stays at its last peak. Trimming after the warm-up and once
the tasks stop brings the idle RSS back down; `fast` also settles glibc's thresholds at
its warm-up, so that a parse stops faulting its temporaries in afresh. Elsewhere (no
glibc) all this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
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
# Otherwise, from the warm-up on for the backends that settle it (`settle_heap`,
# `Backend.settles_heap`): the mmap threshold at glibc's ceiling (32 MB; mallopt refuses
# more), set at once, and a trim threshold above what a parse frees at the heap's top.
# Left to climb, the mmap threshold stops at the largest temporary freed so far, and
# every parse mapped its larger ones afresh and trimmed the heap between layers,
# faulting the pages back in (fast at 960x540, mmap 32 MB and trim 64 MB to 1 GB set
# through glibc's environment variables against adaptive ones, one process pair
# alternating per A/B on a Zen 5 VM: 3,000-8,000 -> 500-900 faults and 60-100 ms less a
# parse in each of four A/Bs). Those 500-900 were the stem's two maps over 32 MB, which
# it now computes in pieces (model.backbone.STEM_CHUNK_BYTES); the heap then held them,
# and a 64 MB trim threshold (twice the mmap one, where glibc's adaptive one goes) gave
# 2,000-4,500 faults a parse back to the OS: at 256 MB none are left (four fresh process
# pairs, stem and threshold together: 1,070 -> 0 faults, 718 -> 690 ms median, peak
# 0.85 -> 0.70 GB). exact's warm-up leaves both adaptive: it has fp32 maps over 32 MB all
# through, and settled, its 960x540 peak reached 0.98-1.01 GB (from 0.92-0.97). (Once
# set they stay set: glibc has no way back to adapting, so a process that
# post-processed a full-resolution photo runs settled from then on, whatever its
# backend: since 2026-11-23 with the 256 MB trim threshold, 64 MB before; the memory
# plan's 4.8 MP task measured 21.9-25.1 B a pixel with it, 21.1-24.2 without.)
SETTLED_MMAP_THRESHOLD = 32 * 2**20
SETTLED_TRIM_THRESHOLD = 256 * 2**20
# Between tasks, freed memory goes back to the OS only once no task has run for this
# long (jemalloc returns its dirty pages on a 10 s decay for the same reason): pages given
# back are faulted in again by the next task, 0.4 ms a MB, and on VMs whose host reclaims
# free guest memory (free page reporting, here) more: trimming after every task cost the
# service's fast 960x540 tasks ~0.2 s (1.39 vs 1.19 s to parse) when they came 3 s apart.
IDLE_TRIM_DELAY_S = 10.0
# Photos from this size give memory back as soon as a phase is done with it: the
# network's activations before post-processing, the full-size maps as the task ends
# (exact's 1080p peak: 0.91 GB so, 0.95 GB without; the memory plan counts on it for
# large photos). Smaller photos leave it for the next task (at 960x540 exact's peak in
# the benchmark rose from 0.93 to 0.94-0.97 GB, fast's from 0.70-0.76 to 0.75-0.78).
EAGER_TRIM_MIN_PIXELS = 1_000_000


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


class _IdleTrim:
    """One daemon thread that gives freed memory back once no task has run for
    IDLE_TRIM_DELAY_S (a timer per task would leave a sleeping thread behind each)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._due: float | None = None  # when to trim, if no task starts before
        self._thread: threading.Thread | None = None

    def task_started(self) -> None:
        with self._cond:
            self._running += 1
            self._due = None

    def task_ended(self) -> None:
        with self._cond:
            self._running -= 1
            if self._running:
                return
            self._due = time.monotonic() + IDLE_TRIM_DELAY_S
            if self._thread is None:
                thread = threading.Thread(target=self._trim_when_due, name="m2fp-idle-trim", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had (out of them, or exiting): trim now
                    release_free_memory()
                    return
                self._thread = thread
            self._cond.notify()

    def _trim_when_due(self) -> None:
        while True:
            with self._cond:
                while self._due is None or time.monotonic() < self._due:
                    self._cond.wait(None if self._due is None else self._due - time.monotonic())
                self._due = None
            release_free_memory()


_idle_trim = _IdleTrim()


@contextmanager
def trimmed_when_idle() -> Iterator[None]:
    """Wrap each task: what its work freed is given back to the OS IDLE_TRIM_DELAY_S
    after the last task ends, unless another starts first (then after that one)."""
    _idle_trim.task_started()
    try:
        yield
    finally:
        _idle_trim.task_ended()


def release_if_large(pixels: int) -> None:
    """Give freed memory back now if the photo being parsed has EAGER_TRIM_MIN_PIXELS or
    more (else the next task reuses it, and trimmed_when_idle gives it back)."""
    if pixels >= EAGER_TRIM_MIN_PIXELS:
        release_free_memory()


_full_resolution_lock = threading.Lock()
_full_resolution_users = 0


def _settle(mallopt) -> None:
    mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)


def settle_heap() -> None:
    """Set glibc's heap thresholds to SETTLED_* (process-wide; left as they are while a
    full-resolution photo is post-processed, which settles them when it ends)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return
    with _full_resolution_lock:
        if _full_resolution_users == 0:
            _settle(mallopt)


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
                _settle(mallopt)
