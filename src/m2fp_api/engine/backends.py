"""How the network is run: the exact fp32 path, or an opt-in faster one.

Every acceleration is optional and falls back to the exact path where the CPU does
not support it; the chosen backend says what it really is (name, dtype, threads).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch


@dataclass(frozen=True)
class Backend:
    name: str  # "torch-fp32" or "torch-bf16"
    dtype: str
    threads: int
    autocast: Callable[[], ContextManager]


def cpu_supports_bf16() -> bool:
    """bf16 only pays off with native instructions (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per available core) and return the count."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def select_backend(requested: str, threads: int) -> Backend:
    if requested == "reference":
        return Backend("torch-fp32-reference", "float32", threads, contextlib.nullcontext)
    if requested == "fast" and cpu_supports_bf16():
        return Backend("torch-bf16", "bfloat16", threads,
                       lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    return Backend("torch-fp32", "float32", threads, contextlib.nullcontext)
