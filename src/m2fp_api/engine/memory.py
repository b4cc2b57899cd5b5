"""Give freed heap memory back to the operating system.

glibc keeps the pages of freed large temporaries (activations, full-size maps) in its
arenas, so a process's RSS stays at its last peak. Trimming after the warm-up and after
each task brings the idle RSS back down; elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
