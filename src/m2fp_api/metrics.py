"""Prometheus metrics: queue depth, in-flight work, task outcomes, stage latencies, RSS."""

from __future__ import annotations

from typing import Callable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .tasks.task import TaskOutcome

STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


def _or_nan(read: Callable[[], float]) -> Callable[[], float]:
    """A gauge whose source (Redis, in cluster mode) may be away reads NaN, not an error."""
    def safe() -> float:
        try:
            return read()
        except Exception:
            return float("nan")
    return safe


class Metrics:
    def __init__(self, depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        Gauge("m2fp_queue_depth", "Tasks waiting for a slot",
              registry=self.registry).set_function(_or_nan(depth))
        Gauge("m2fp_in_flight", "Tasks running now", registry=self.registry).set_function(_or_nan(in_flight))
        process = psutil.Process()
        Gauge("m2fp_process_rss_bytes", "Resident memory of the service process",
              registry=self.registry).set_function(lambda: process.memory_info().rss)
        self.outcomes = Counter("m2fp_tasks", "Tasks by final status", ["status"], registry=self.registry)
        self.rejected = Counter("m2fp_rejected", "Submissions refused before queueing", ["code"],
                                registry=self.registry)
        self.replays = Counter("m2fp_replays", "Submissions answered with the task of an earlier one "
                               "with the same Idempotency-Key", registry=self.registry)
        self.stage_seconds = Histogram("m2fp_stage_seconds", "Time per processing stage", ["stage"],
                                       buckets=STAGE_BUCKETS_S, registry=self.registry)

    def task_finished(self, outcome: TaskOutcome) -> None:
        self.outcomes.labels(status=outcome.status.value).inc()
        for stage, ms in outcome.timings_ms.items():
            self.stage_seconds.labels(stage=stage).observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
