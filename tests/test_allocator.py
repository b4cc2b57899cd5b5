"""How the process's memory is served: glibc's thresholds while a large photo is
post-processed, when freed memory goes back to the OS, and transparent huge pages for
torch's large allocations (engine.memory, m2fp_api/__init__.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from m2fp_api import HumanParser
from m2fp_api.engine import memory
from m2fp_api.engine.backends import select_backend
from m2fp_api.engine.checkpoint import load_network
from m2fp_api.engine.optimize import optimize


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


SETTLED = {memory.M_MMAP_THRESHOLD: memory.SETTLED_MMAP_THRESHOLD,
           memory.M_TRIM_THRESHOLD: memory.SETTLED_TRIM_THRESHOLD}


def test_large_photos_are_post_processed_in_mappings_of_their_own(mallopt_calls):
    with memory.full_resolution_heap(memory.FULL_RESOLUTION_MIN_PIXELS):
        assert mallopt_calls == [(memory.M_MMAP_THRESHOLD, memory.FULL_RESOLUTION_MMAP_THRESHOLD)]
    assert dict(mallopt_calls[1:]) == SETTLED


def test_smaller_photos_leave_the_heap_as_it_is(mallopt_calls):
    with memory.full_resolution_heap(memory.FULL_RESOLUTION_MIN_PIXELS - 1):
        assert mallopt_calls == []


@pytest.mark.parametrize("level", ["exact", "fast"])
def test_only_fasts_warm_up_settles_the_heap_thresholds(mallopt_calls, multiple_parser, level):
    """fast sets them where glibc's adaptive thresholds would climb to, from the first
    parse on; exact, whose peak has no room for what the heap then keeps, leaves them."""
    source = multiple_parser.source
    backend = select_backend(level, threads=1, bf16=level == "fast", int8=False)
    parser = HumanParser(optimize(load_network(source), backend.level, backend.int8), source, backend)
    parser.warm_up()
    assert dict(mallopt_calls) == (SETTLED if level == "fast" else {})


def test_settling_waits_for_a_full_resolution_phase_to_end(mallopt_calls):
    with memory.full_resolution_heap(memory.FULL_RESOLUTION_MIN_PIXELS):
        memory.settle_heap()  # another thread's task, say
        assert mallopt_calls == [(memory.M_MMAP_THRESHOLD, memory.FULL_RESOLUTION_MMAP_THRESHOLD)]
    assert dict(mallopt_calls[1:]) == SETTLED


@pytest.fixture
def trims(monkeypatch):
    """The moments memory was given back to the OS, with a short idle delay."""
    calls: list[float] = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(time.monotonic()))
    monkeypatch.setattr(memory, "IDLE_TRIM_DELAY_S", 1.0)
    return calls


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_memory_goes_back_once_no_task_has_run_for_the_delay(trims):
    with memory.trimmed_when_idle():
        pass
    assert trims == []  # not as the task ends: the next one would fault it all in again
    time.sleep(memory.IDLE_TRIM_DELAY_S / 5)
    with memory.trimmed_when_idle():  # a task within the delay starts it over
        ended = time.monotonic()
    wait_for(lambda: trims)
    assert trims[0] - ended >= memory.IDLE_TRIM_DELAY_S
    time.sleep(2 * memory.IDLE_TRIM_DELAY_S)
    assert len(trims) == 1  # once


def test_no_memory_goes_back_while_a_task_runs(trims):
    with memory.trimmed_when_idle():
        pass
    with memory.trimmed_when_idle():  # outlasts the first task's delay
        time.sleep(2 * memory.IDLE_TRIM_DELAY_S)
        assert trims == []
    wait_for(lambda: trims)


def test_memory_stays_while_any_concurrent_task_runs(trims):
    second_started, second_may_end = threading.Event(), threading.Event()

    def second():
        with memory.trimmed_when_idle():
            second_started.set()
            second_may_end.wait(10)

    thread = threading.Thread(target=second)
    thread.start()
    assert second_started.wait(10)
    with memory.trimmed_when_idle():
        pass
    time.sleep(2 * memory.IDLE_TRIM_DELAY_S)
    assert trims == []
    second_may_end.set()
    thread.join()
    wait_for(lambda: trims)


def test_only_a_large_photo_gives_memory_back_at_once(trims):
    memory.release_if_large(memory.EAGER_TRIM_MIN_PIXELS)
    assert len(trims) == 1
    memory.release_if_large(memory.EAGER_TRIM_MIN_PIXELS - 1)
    assert len(trims) == 1


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
