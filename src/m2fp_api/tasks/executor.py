"""The executor interface, and the embedded one: the models loaded in this process, a
bounded queue in front of a fixed number of inference slots (threads sharing it).

Time limits: a task waiting longer than the queue limit fails with `timeout`; a task
running longer than the run limit is marked failed (`timeout`) at once, and its slot
is held until the work really stops at its next stage boundary, so a runaway task can
never overlap the next one. Cancellation works the same way.

The models (`M2FP_MODELS`) load in the background after `start`, so the service answers
`/healthz` at once and says 503 until every one of them is loaded and warmed: there is
no partial readiness, a service that cannot load one of its models serves none
(`model_unavailable`). The slots, shared by all models, are then sized to the memory
budget from the idle RSS measured after all of them are loaded and warmed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import psutil

from ..errors import Draining, ModelUnavailable, NotLoaded, QueueFull
from ..settings import Settings
from .memory_plan import MB, MemoryPlan
from .model_card import LoadedModels, ModelCard
from .task import TaskOptions, TaskOutcome, TaskStatus
from .pacing import PACE_WINDOW, book, slot_interval_s
from .store import TaskStore
from .run import STOP_FAILURES, fail_task, run_task

log = logging.getLogger("m2fp.executor")

WATCHDOG_INTERVAL_S = 0.1


class Executor(Protocol):
    """Runs the work recorded in the store to a terminal status there. The service core
    knows executors through this alone: which one runs is decided once, from the
    settings (`modes.py`)."""

    # called once for every run of a task, with how it ended (in cluster mode by the one
    # API process that collected the worker's report)
    on_finished: Callable[[TaskOutcome], None] | None

    def start(self) -> None:
        """Begin in the background (load the models, or watch the workers); returns at once."""

    @property
    def models(self) -> tuple[ModelCard, ...]:
        """The models tasks run on, the default first; NotLoaded or ModelUnavailable (503)
        while there are none."""

    @property
    def slots(self) -> int:
        """How many tasks run at once."""

    def admit(self, width: int, height: int) -> None:
        """Refuse, before queueing, a photo a task here could not hold (ImageTooLarge)."""

    def submit(self, task_id: str, payload: bytes, options: TaskOptions) -> None:
        """Enqueue to run on `options.model` (one of `models`), or raise QueueFull / Draining."""

    def cancel(self, task_id: str) -> None:
        """Queued: never runs. Running: stops at its next stage boundary."""

    def queue_position(self, task_id: str) -> int | None:
        """1 for the next task to run; None when not queued."""

    def retry_after_s(self) -> int:
        """When a client refused now is likely to find a queue place (see pacing)."""

    def depth(self) -> int:
        """Tasks waiting for a slot."""

    def in_flight(self) -> int:
        """Tasks running now."""

    def drain(self, deadline_s: float) -> None:
        """Refuse new work, let queued and running work finish within the deadline, then
        fail what is left with `shutdown`."""

    @property
    def draining(self) -> bool: ...

    def still_running(self) -> bool:
        """After `drain`: whether threads of this process are still inside work that cannot
        be interrupted (an abandoned task in a torch kernel, a background compile)."""


@dataclass
class _Job:
    task_id: str
    payload: bytes
    options: TaskOptions
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    stop_reason: str | None = None


class InProcessExecutor:
    def __init__(self, store: TaskStore, settings: Settings,
                 load: Callable[[], LoadedModels] | None = None) -> None:
        """`load` builds the models (by default from the settings); it runs on `start`, in
        the background."""
        self.store = store
        self.settings = settings
        self.slots = 0  # sized once the model is warm
        self.queue_size = settings.queue_size
        self.queue_timeout_s = settings.queue_timeout_s
        self.run_timeout_s = settings.run_timeout_s
        self.on_finished: Callable[[TaskOutcome], None] | None = None
        self._load = load or (lambda: LoadedModels.load(settings))
        self._queue: deque[_Job] = deque()
        self._running: dict[str, _Job] = {}
        self._cond = threading.Condition()
        self._draining = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._models: LoadedModels | None = None
        self._plan: MemoryPlan | None = None
        self._load_error: ModelUnavailable | None = None
        self._recent_run_s: deque[float] = deque(maxlen=PACE_WINDOW)
        self._booked_until = 0.0  # the moment the last refused client was promised a place
        self._rng = random.Random()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._load_model, name="m2fp-load", daemon=True).start()

    def _load_model(self) -> None:
        started = time.time()
        try:
            models = self._load()
        except ModelUnavailable as exc:
            self._load_error = exc
            log.error("model unavailable: %s", exc.message)
            return
        except Exception:
            log.exception("model failed to load")
            self._load_error = ModelUnavailable("A model failed to load; see the service log.")
            return
        idle = psutil.Process().memory_info().rss  # every model's weights are in it now
        self._plan = MemoryPlan.for_service(self.settings, idle)
        self.slots = self._plan.slots
        self._models = models
        self._start_slots()
        for card in models.cards:
            info = card.info
            log.info("model %s loaded (pretrained=%s, %s, %d threads)", info.id, info.pretrained,
                     info.backend, info.threads)
            if not info.pretrained:
                log.warning("model %s is a STAND-IN with random weights: results are not real parses", info.id)
        log.info("ready: %d model(s), %d slot(s), idle RSS %d MB, %.1f s after start",
                 len(models.cards), self.slots, idle // MB, time.time() - started)

    def _start_slots(self) -> None:
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

    def still_running(self) -> bool:
        return bool(self.in_flight()) or (self._models is not None and self._models.compiling())

    # -- the models ---------------------------------------------------------------------
    @property
    def models(self) -> tuple[ModelCard, ...]:
        if self._models is None:
            if self._load_error is not None:
                raise self._load_error
            raise NotLoaded("The model is still loading; retry shortly.")
        return self._models.cards

    def admit(self, width: int, height: int) -> None:
        if self._plan is not None:
            self._plan.admit(width, height)

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
        fail_task(self.store, task_id, STOP_FAILURES[reason]())

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
                run_task(self._models.parser(job.options.model), self.store, job.task_id, job.payload, job.options,
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
