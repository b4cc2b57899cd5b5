"""How glibc serves large allocations in each phase of a parse (engine.memory)."""

from __future__ import annotations

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


def _settings(calls):
    """The thresholds in force after the calls so far: (mmap, trim)."""
    latest = dict(calls)
    return latest[memory.M_MMAP_THRESHOLD], latest[memory.M_TRIM_THRESHOLD]


def test_the_network_keeps_its_activations_in_an_untrimmed_heap(mallopt_calls):
    with memory.network_heap():
        assert _settings(mallopt_calls) == (memory.UNTRIMMED_MMAP_THRESHOLD, memory.UNTRIMMED_TRIM_THRESHOLD)
    assert _settings(mallopt_calls) == (memory.SETTLED_MMAP_THRESHOLD, memory.SETTLED_TRIM_THRESHOLD)


def test_full_resolution_post_processing_prevails_over_a_concurrent_network(mallopt_calls):
    full_resolution = (memory.FULL_RESOLUTION_MMAP_THRESHOLD, memory.SETTLED_TRIM_THRESHOLD)
    network = (memory.UNTRIMMED_MMAP_THRESHOLD, memory.UNTRIMMED_TRIM_THRESHOLD)
    with memory.network_heap():  # one task's network ...
        with memory.post_processing_heap(memory.FULL_RESOLUTION_MIN_PIXELS):  # ... another's 4 MP maps
            assert _settings(mallopt_calls) == full_resolution
            with memory.network_heap():  # a third task's network starts meanwhile
                assert _settings(mallopt_calls) == full_resolution
            assert _settings(mallopt_calls) == full_resolution
        assert _settings(mallopt_calls) == network
    assert _settings(mallopt_calls) == (memory.SETTLED_MMAP_THRESHOLD, memory.SETTLED_TRIM_THRESHOLD)


def test_smaller_photos_leave_the_heap_as_it_is(mallopt_calls):
    with memory.post_processing_heap(memory.FULL_RESOLUTION_MIN_PIXELS - 1):
        assert mallopt_calls == []


def test_a_failing_network_restores_the_settled_thresholds(mallopt_calls):
    with pytest.raises(RuntimeError), memory.network_heap():
        raise RuntimeError("the network failed")
    assert _settings(mallopt_calls) == (memory.SETTLED_MMAP_THRESHOLD, memory.SETTLED_TRIM_THRESHOLD)
