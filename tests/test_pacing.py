"""Retry-After planning (issue 11, item 7) as a pure function, with seeded jitter."""

from __future__ import annotations

import random

import pytest

from m2fp_api.tasks.pacing import (DEFAULT_RUN_S, JITTER, RETRY_AFTER_MAX_S, book, slot_interval_s)


def refuse(clients: int, now: float, interval_s: float, seed: int = 0, booked_until: float = 0.0):
    rng = random.Random(seed)
    waits = []
    for _ in range(clients):
        booking = book(now, booked_until, interval_s, rng)
        booked_until = booking.booked_until
        waits.append(booking.retry_after_s)
    return waits, booked_until


def test_interval_is_the_median_recent_run_over_the_slots():
    assert slot_interval_s([], 1) == DEFAULT_RUN_S
    assert slot_interval_s([1.0, 9.0, 3.0], 2) == 1.5  # an outlier does not move it
    assert slot_interval_s([4.0], 0) == 4.0


def test_refused_clients_are_lined_up_not_sent_away_together():
    """The soak of issue 11: 8 clients refused at once, one slot, 10 s a photo. They come
    back one slot-time apart (so the queue stays fed), not all after the whole queue."""
    waits, booked_until = refuse(8, now=1000.0, interval_s=10.0)
    assert booked_until == pytest.approx(1080.0)
    for k, wait in enumerate(waits, start=1):
        assert 10 * k * (1 - JITTER) <= wait <= 10 * k * (1 + JITTER) + 1, (k, waits)
    comebacks = sorted(waits)
    assert max(b - a for a, b in zip(comebacks, comebacks[1:])) <= 2 * 10  # no long idle gap
    assert len(set(waits)) == len(waits)


def test_jitter_is_seeded_and_spreads_equal_promises():
    assert refuse(5, 0.0, 3.0, seed=7) == refuse(5, 0.0, 3.0, seed=7)
    # two API processes booking the same moment tell their clients different times
    a = [book(0.0, 0.0, 20.0, random.Random(seed)).retry_after_s for seed in range(10)]
    assert len(set(a)) > 1 and all(15 <= w <= 25 for w in a)


def test_promises_lapse_as_time_passes():
    _, booked_until = refuse(3, now=0.0, interval_s=5.0)
    later = book(100.0, booked_until, 5.0, random.Random(0))
    assert later.booked_until == 105.0 and later.retry_after_s <= 5 * (1 + JITTER) + 1


def test_waits_are_bounded():
    waits, booked_until = refuse(1000, now=0.0, interval_s=30.0)
    assert all(1 <= w <= RETRY_AFTER_MAX_S for w in waits)
    assert booked_until <= RETRY_AFTER_MAX_S
    fast, _ = refuse(5, now=0.0, interval_s=0.001)
    assert fast == [1] * 5  # at least a second: the header's unit
