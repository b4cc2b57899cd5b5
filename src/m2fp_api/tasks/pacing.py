"""When a client refused for capacity should come back (`Retry-After`).

A queue place frees each time a slot finishes a task: about every `run / slots`
seconds at the recent pace. Telling every refused client "when the whole queue has
drained" sends them all to sleep at once and leaves the service idle when they are
away; so refused clients are lined up over the moments places free instead: each
refusal books the next moment after those already promised. Jitter spreads clients
booked for nearby moments (also by different API processes), and promises lapse as
time passes, so a client that never comes back holds nothing for long.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# the pace assumed before any task has finished (a small photo on the full-size model)
DEFAULT_RUN_S = 2.0
# how many recent run times the pace is the median of
PACE_WINDOW = 20
# each wait is scaled by a factor drawn from 1 ± JITTER
JITTER = 0.25
# nobody is sent away longer than this: past it the line is re-planned on the next try
RETRY_AFTER_MAX_S = 300


def slot_interval_s(recent_run_s: Sequence[float], slots: int) -> float:
    """Seconds between two queue places freeing, at the recent pace."""
    run_s = statistics.median(recent_run_s) if recent_run_s else DEFAULT_RUN_S
    return run_s / max(1, slots)


@dataclass(frozen=True)
class Booking:
    booked_until: float  # when the last promised place is expected to free (epoch s)
    retry_after_s: int  # what to tell this client


def book(now: float, booked_until: float, interval_s: float, rng: random.Random) -> Booking:
    """Promise a refused client the next place after those already promised."""
    until = min(max(now, booked_until) + interval_s, now + RETRY_AFTER_MAX_S)
    wait = (until - now) * rng.uniform(1 - JITTER, 1 + JITTER)
    return Booking(until, min(RETRY_AFTER_MAX_S, max(1, math.ceil(wait))))
