"""The API side of cluster mode: enqueue to Celery, with backpressure, cancellation
and a reaper, behind the same `Executor` interface as the in-process one.

- Backpressure across the cluster: the queue depth (tasks accepted, not yet taken by
  a worker) is read from Redis before enqueueing; at the bound the answer is 503.
- Cancellation: a queued task is cancelled in the store and its upload dropped, so a
  worker that takes it skips it; a running one is told to stop at its next stage.
- The reaper (one per API process; its updates are conditional, so several agree):
  queued tasks past the queue limit fail with `timeout`; running tasks past the run
  limit fail with `timeout` and are told to stop; running tasks whose worker stopped
  signalling fail with `worker_lost`. Celery itself reports unknown ids as PENDING, so
  the store is the only authority on what exists.
- Metrics: workers report how each run ended to Redis; the reaper collects those
  reports (each by one API process) and hands them to `on_finished`, so `/metrics`
  counts outcomes and stage times as in-process. Summed over the API processes (as
  Prometheus does), each run counts once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

import kombu.exceptions

from ..errors import Draining, NotLoaded, QueueFull, StoreUnavailable, TimedOut, WorkerLost
from ..settings import Settings
from .celery_app import TASK_NAME, make_celery
from .model_card import ModelCard, cards_from_json
from .pacing import slot_interval_s
from .redis_queue import RedisQueue
from .redis_store import RedisStore
from .run import fail_task
from .task import TaskOptions, TaskOutcome, TaskStatus

log = logging.getLogger("m2fp.cluster")
REAP_INTERVAL_S = 0.5


class CeleryExecutor:
    def __init__(self, store: RedisStore, queue: RedisQueue, settings: Settings) -> None:
        self.store = store
        self.queue = queue
        self.settings = settings
        self._rng = random.Random()
        self.app = make_celery(settings)
        self.on_finished: Callable[[TaskOutcome], None] | None = None
        self._draining = False
        self._stop = threading.Event()
        # the last cards read, as published and parsed
        self._cards: tuple[bytes, tuple[ModelCard, ...]] | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._reap_loop, name="m2fp-reaper", daemon=True).start()

    def drain(self, deadline_s: float) -> None:
        """An API process has no work of its own: it stops accepting; workers drain
        their tasks on their own SIGTERM (Celery's warm shutdown)."""
        self._draining = True
        self._stop.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def still_running(self) -> bool:
        return False  # the work runs in the workers

    # -- the models ---------------------------------------------------------------------
    @property
    def models(self) -> tuple[ModelCard, ...]:
        """The workers' models, as the first live worker process published them: the API
        holds none of its own. Every worker loads every model of its M2FP_MODELS, so any
        worker takes any task and runs it on the model its options name. StoreUnavailable
        (503) when Redis is away."""
        published = self.queue.worker_cards()
        if not published:
            raise NotLoaded("No worker is running yet; start `m2fp worker`.")
        if self._cards is None or self._cards[0] != published[0]:  # parsed again only when they change
            self._cards = (published[0], cards_from_json(published[0]))
        return self._cards[1]

    @property
    def slots(self) -> int:
        return len(self.queue.worker_cards())

    def admit(self, width: int, height: int) -> None:
        """The API does not know the workers' idle memory: no memory plan to check here."""

    # -- interface ------------------------------------------------------------------
    def submit(self, task_id: str, payload: bytes, options: TaskOptions) -> None:
        if self._draining:
            raise Draining("The service is shutting down; try another instance.")
        if self.queue.depth() >= self.settings.queue_size:
            raise QueueFull("The queue is full; retry later.", self.retry_after_s())
        self.queue.enqueue(task_id, payload)
        try:
            self.app.send_task(TASK_NAME, args=[task_id, options.to_dict()], retry=False)
        except (kombu.exceptions.OperationalError, OSError):
            self.queue.remove(task_id)
            raise StoreUnavailable("broker unreachable") from None

    def cancel(self, task_id: str) -> None:
        if self.store.update(task_id, if_status=(TaskStatus.queued,), status=TaskStatus.cancelled,
                             finished_at=time.time()):
            self.queue.remove(task_id)
        else:
            self.queue.stop(task_id, "cancelled", keep_earlier=True)

    def queue_position(self, task_id: str) -> int | None:
        return self.queue.position(task_id)

    def depth(self) -> int:
        return self.queue.depth()

    def in_flight(self) -> int:
        return self.queue.running_count()

    def retry_after_s(self) -> int:
        """Pacing across the cluster: the run times workers report, the live worker
        processes, and one line of promises shared by every API process."""
        return self.queue.book(slot_interval_s(self.queue.recent_runs(), self.slots), self._rng)

    # -- reaper -------------------------------------------------------------------------
    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            try:
                self.reap()
                self.collect_outcomes()
            except StoreUnavailable:
                pass  # Redis is away; the API answers 503 meanwhile
            except Exception:
                log.warning("reaper failed", exc_info=True)

    def reap(self) -> None:
        now = time.time()
        for task_id in self.queue.queued_before(now - self.settings.queue_timeout_s):
            fail_task(self.store, task_id, TimedOut(), (TaskStatus.queued,))
            self.queue.remove(task_id)
        for task_id in self.queue.running():
            record = self.store.get(task_id)
            if record is None or record.status.terminal:
                self.queue.forget_running(task_id)
                continue
            if not self.queue.alive(task_id):
                # killed, also between taking the task and marking it running
                fail_task(self.store, task_id, WorkerLost())
                self.queue.forget_running(task_id)
            elif record.status is TaskStatus.running and record.started_at and now - record.started_at > self.settings.run_timeout_s:
                fail_task(self.store, task_id, TimedOut(), (TaskStatus.running,))
                self.queue.stop(task_id, "timeout")

    def collect_outcomes(self) -> None:
        for outcome in self.queue.collect():
            if self.on_finished is not None:
                self.on_finished(outcome)
