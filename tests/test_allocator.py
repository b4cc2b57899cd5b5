"""How the process's memory is served: glibc's thresholds while a large photo is
post-processed, and transparent huge pages for torch's large allocations
(engine.memory, m2fp_api/__init__.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from m2fp_api.engine import memory


@pytest.fixture
def mallopt_calls(monkeypatch):
    """The (parameter, value) pairs given to mallopt, instead of glibc."""
    calls: list[tuple[int, int]] = []
    real = memory._libc_function

    def libc_function(name):
        if name == "mallopt":
            return lambda parameter, value: calls.append((parameter, value)) or 1
        return real(name)

    monkeypatch.setattr(memory, "_libc_function", libc_function)
    return calls


def test_large_photos_are_post_processed_in_mappings_of_their_own(mallopt_calls):
    with memory.full_resolution_heap(memory.FULL_RESOLUTION_MIN_PIXELS):
        assert mallopt_calls == [(memory.M_MMAP_THRESHOLD, memory.FULL_RESOLUTION_MMAP_THRESHOLD)]
    assert dict(mallopt_calls[1:]) == {memory.M_MMAP_THRESHOLD: memory.SETTLED_MMAP_THRESHOLD,
                                       memory.M_TRIM_THRESHOLD: memory.SETTLED_TRIM_THRESHOLD}


def test_smaller_photos_leave_the_heap_as_it_is(mallopt_calls):
    with memory.full_resolution_heap(memory.FULL_RESOLUTION_MIN_PIXELS - 1):
        assert mallopt_calls == []


HUGE_PAGES = """
import re
import m2fp_api  # before torch, as the service and the CLI import it
import torch

block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
rollup = open("/proc/self/smaps_rollup").read()
print(int(re.search(r"AnonHugePages:\\s+(\\d+) kB", rollup).group(1)))
"""


def test_large_tensors_ask_for_transparent_huge_pages():
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel grants no transparent huge pages")
    huge_kb = int(subprocess.run([sys.executable, "-c", HUGE_PAGES], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert huge_kb >= 32 * 1024  # most of the 64 MB block
