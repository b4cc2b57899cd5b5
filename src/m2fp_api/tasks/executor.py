"""The executor interface, and the embedded one: a bounded queue in front of a fixed
number of inference slots (threads sharing one warm model).

Time limits: a task waiting longer than the queue limit fails with `timeout`; a task
running longer than the run limit is marked failed (`timeout`) at once, and its slot
is held until the work really stops at its next stage boundary, so a runaway task can
never overlap the next one. Cancellation works the same way.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..engine import HumanParser, ParseResult
from ..errors import Draining, QueueFull
from .task import TaskOptions, TaskStatus
from .pacing import PACE_WINDOW, book, slot_interval_s
from .store import TaskStore
from .run import ABANDON_MESSAGES, fail_task, run_task

log = logging.getLogger("m2fp.executor")

WATCHDOG_INTERVAL_S = 0.1


class Executor(Protocol):
    def submit(self, task_id: str, payload: bytes, options: TaskOptions) -> None:
        """Enqueue, or raise QueueFull / Draining."""

    def cancel(self, task_id: str) -> None:
        """Queued: never runs. Running: stops at its next stage boundary."""

    def queue_position(self, task_id: str) -> int | None:
        """1 for the next task to run; None when not queued."""

    def retry_after_s(self) -> int:
        """When a client refused now is likely to find a queue place (see pacing)."""

    def depth(self) -> int: ...

    def in_flight(self) -> int: ...

    def drain(self, deadline_s: float) -> None:
        """Refuse new work, let queued and running work finish within the deadline, then
        fail what is left with `shutdown`."""


@dataclass
class _Job:
    task_id: str
    payload: bytes
    options: TaskOptions
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    stop_reason: str | None = None


class InProcessExecutor:
    def __init__(self, store: TaskStore, *, slots: int, queue_size: int, queue_timeout_s: float,
                 run_timeout_s: float,
                 on_finished: Callable[[str, ParseResult | None], None] | None = None) -> None:
        self.store = store
        self.slots = slots
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.run_timeout_s = run_timeout_s
        self.on_finished = on_finished
        self._queue: deque[_Job] = deque()
        self._running: dict[str, _Job] = {}
        self._cond = threading.Condition()
        self._draining = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._parser: HumanParser | None = None
        self._recent_run_s: deque[float] = deque(maxlen=PACE_WINDOW)
        self._booked_until = 0.0  # the moment the last refused client was promised a place
        self._rng = random.Random()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, parser: HumanParser) -> None:
        self._parser = parser
        for i in range(self.slots):
            t = threading.Thread(target=self._work_loop, name=f"m2fp-slot-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._watchdog, name="m2fp-watchdog", daemon=True)
        t.start()
        self._threads.append(t)

    def drain(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        with self._cond:
            self._draining = True
            while (self._queue or self._running) and time.monotonic() < end:
                self._cond.wait(timeout=0.1)
            for job in self._queue:
                self._fail(job.task_id, "shutdown")
            self._queue.clear()
            for job in self._running.values():
                job.stop_reason = "shutdown"
                self._fail(job.task_id, "shutdown")
            self._stopping = True
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    # -- interface ------------------------------------------------------------------
    def submit(self, task_id: str, payload: bytes, options: TaskOptions) -> None:
        with self._cond:
            if self._draining:
                raise Draining("The service is shutting down; try another instance.")
            if len(self._queue) >= self.queue_size:
                raise QueueFull("The queue is full; retry later.", self.retry_after_s())
            self._queue.append(_Job(task_id, payload, options))
            self._cond.notify()

    def cancel(self, task_id: str) -> None:
        with self._cond:
            for job in self._queue:
                if job.task_id == task_id:
                    self._queue.remove(job)
                    self.store.update(task_id, if_status=(TaskStatus.queued,),
                                      status=TaskStatus.cancelled, finished_at=time.time())
                    return
            job = self._running.get(task_id)
            if job is not None and job.stop_reason is None:
                job.stop_reason = "cancelled"

    def queue_position(self, task_id: str) -> int | None:
        with self._cond:
            for i, job in enumerate(self._queue):
                if job.task_id == task_id:
                    return i + 1
        return None

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def in_flight(self) -> int:
        with self._cond:
            return len(self._running)

    def retry_after_s(self) -> int:
        with self._cond:
            booking = book(time.time(), self._booked_until,
                           slot_interval_s(self._recent_run_s, self.slots), self._rng)
            self._booked_until = booking.booked_until
            return booking.retry_after_s

    # -- internals ------------------------------------------------------------------
    def _fail(self, task_id: str, reason: str) -> None:
        fail_task(self.store, task_id, reason, ABANDON_MESSAGES[reason])

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                job.started_at = time.monotonic()
                self._running[job.task_id] = job
            try:
                run_task(self._parser, self.store, job.task_id, job.payload, job.options,
                         should_stop=lambda: job.stop_reason, on_finished=self.on_finished)
            finally:
                with self._cond:
                    # the slot is free only now that the work has really stopped
                    del self._running[job.task_id]
                    self._recent_run_s.append(time.monotonic() - job.started_at)
                    self._cond.notify_all()

    def _watchdog(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                for job in [j for j in self._queue if now - j.enqueued_at > self.queue_timeout_s]:
                    self._queue.remove(job)
                    self._fail(job.task_id, "timeout")
                for job in self._running.values():
                    if job.stop_reason is None and now - job.started_at > self.run_timeout_s:
                        job.stop_reason = "timeout"
                        self._fail(job.task_id, "timeout")
                self._cond.wait(timeout=WATCHDOG_INTERVAL_S)
