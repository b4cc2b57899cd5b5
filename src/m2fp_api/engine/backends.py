"""How the network is run: the exact fp32 path, or an opt-in faster one.

Every acceleration is optional and falls back to the exact path where the CPU does
not support it; the chosen backend says what it really is (name, dtype, threads).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

# what `HumanParser.from_pretrained(backend=...)`, M2FP_BACKEND and `--backend` may name
BACKENDS = ("exact", "fast", "reference", "onnxruntime")


@dataclass(frozen=True)
class Backend:
    name: str  # "torch-fp32", "torch-int8-bf16", "torch-int8", "torch-bf16",
    # "torch-fp32-reference" or "onnxruntime-fp32"
    dtype: str
    threads: int
    level: str  # the network optimisation level (engine.optimize)
    int8: bool = False  # the backbone and the encoder's feed-forwards in int8 (engine.int8)

    @property
    def bf16(self) -> bool:
        """The network runs under bf16 autocast (and multiple-human post-processing
        resizes masks with bf16 products)."""
        return self.level == "fast"

    @property
    def settles_heap(self) -> bool:
        """Its warm-up sets glibc's heap thresholds where they would climb to
        (`memory.settle_heap`, which says what that costs and saves): the bf16 forms of
        `fast` have room for the higher peak, `exact` at 960x540 has not. Process-wide:
        in a process that also holds another backend's parser, both run settled."""
        return self.bf16


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_simd() -> tuple[str, ...]:
    """The vector extensions that matter here, as the kernel reports them."""
    flags = _cpuinfo()
    return tuple(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni",
                             "amx_int8") if f" {f}" in flags)


def cpu_supports_bf16() -> bool:
    """bf16 only pays off with native instructions (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_simd()))


def cpu_supports_int8() -> bool:
    """int8 only pays off with native dot products (VNNI or AMX-INT8)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_simd()))


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per available core) and return the count."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def select_backend(requested: str, threads: int, bf16: bool | None = None,
                   int8: bool | None = None) -> Backend:
    """`fast` uses what the CPU runs natively: an int8 backbone and encoder feed-forwards
    with VNNI or AMX-INT8, the rest in bf16 (everything, without int8) with AVX512-BF16 or
    AMX; `bf16` and `int8` override the checks. With neither it is the exact path, and
    says so in its name."""
    if requested == "reference":
        return Backend("torch-fp32-reference", "float32", threads, "reference")
    if requested == "onnxruntime":
        return Backend("onnxruntime-fp32", "float32", threads, "onnx")
    if requested == "fast":
        bf16 = cpu_supports_bf16() if bf16 is None else bf16
        int8 = cpu_supports_int8() if int8 is None else int8
        level = "fast" if bf16 else "exact"
        if int8:
            return Backend("torch-int8-bf16" if bf16 else "torch-int8",
                           "int8+bfloat16+float32" if bf16 else "int8+float32", threads, level, True)
        if bf16:
            return Backend("torch-bf16", "bfloat16+float32", threads, level)
    return Backend("torch-fp32", "float32", threads, "exact")
