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
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import kombu.exceptions
import redis

from ..errors import Draining, QueueFull, StoreUnavailable
from ..settings import Settings
from .celery_app import (ALIVE, BOOKED_UNTIL, PACE, PAYLOAD, QUEUED, RUNNING, STOP, TASK_NAME, WORKERS,
                         make_celery)
from .task import TaskOptions, TaskStatus
from .pacing import RETRY_AFTER_MAX_S, book, slot_interval_s
from .redis_store import RedisStore, unavailable_on_redis_errors
from .run import ABANDON_MESSAGES, fail_task

log = logging.getLogger("m2fp.cluster")
REAP_INTERVAL_S = 0.5
WORKER_LOST = "The worker running this task stopped."


class CeleryExecutor:
    def __init__(self, store: RedisStore, settings: Settings) -> None:
        self.store = store
        self.redis = store.redis
        self.settings = settings
        self._rng = random.Random()
        self.app = make_celery(settings)
        self._draining = False
        self._stop = threading.Event()

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

    @property
    def slots(self) -> int:
        return len(self.workers())

    # -- interface ------------------------------------------------------------------
    @unavailable_on_redis_errors
    def submit(self, task_id: str, payload: bytes, options: TaskOptions) -> None:
        if self._draining:
            raise Draining("The service is shutting down; try another instance.")
        if self.redis.zcard(QUEUED) >= self.settings.queue_size:
            raise QueueFull("The queue is full; retry later.", self.retry_after_s())
        pipe = self.redis.pipeline()
        pipe.set(PAYLOAD.format(task_id), payload, px=int(self.settings.queue_timeout_s * 1000))
        pipe.zadd(QUEUED, {task_id: time.time()})
        pipe.execute()
        try:
            self.app.send_task(TASK_NAME, args=[task_id, {"outputs": list(options.outputs),
                                                          "overlay_alpha": options.overlay_alpha}],
                               retry=False)
        except (kombu.exceptions.OperationalError, OSError):
            self.redis.delete(PAYLOAD.format(task_id))
            self.redis.zrem(QUEUED, task_id)
            raise StoreUnavailable("broker unreachable") from None

    @unavailable_on_redis_errors
    def cancel(self, task_id: str) -> None:
        if self.store.update(task_id, if_status=(TaskStatus.queued,), status=TaskStatus.cancelled,
                             finished_at=time.time()):
            self.redis.delete(PAYLOAD.format(task_id))
            self.redis.zrem(QUEUED, task_id)
        else:
            self.redis.set(STOP.format(task_id), "cancelled", nx=True,
                           px=int(self.settings.run_timeout_s * 2000))

    @unavailable_on_redis_errors
    def queue_position(self, task_id: str) -> int | None:
        rank = self.redis.zrank(QUEUED, task_id)
        return None if rank is None else rank + 1

    @unavailable_on_redis_errors
    def depth(self) -> int:
        return self.redis.zcard(QUEUED)

    @unavailable_on_redis_errors
    def in_flight(self) -> int:
        return self.redis.scard(RUNNING)

    @unavailable_on_redis_errors
    def retry_after_s(self) -> int:
        """Pacing across the cluster: the run times workers report, the live worker
        processes, and one line of promises shared by every API process."""
        interval = slot_interval_s([float(s) for s in self.redis.lrange(PACE, 0, -1)], self.slots)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(BOOKED_UNTIL)
                    booking = book(time.time(), float(pipe.get(BOOKED_UNTIL) or 0), interval, self._rng)
                    pipe.multi()
                    pipe.set(BOOKED_UNTIL, booking.booked_until, px=RETRY_AFTER_MAX_S * 1000)
                    pipe.execute()
                    return booking.retry_after_s
                except redis.WatchError:
                    continue

    @unavailable_on_redis_errors
    def workers(self) -> list[dict]:
        keys = list(self.redis.scan_iter(WORKERS, count=100))
        docs = self.redis.mget(keys) if keys else []
        return [json.loads(d) for d in docs if d]

    # -- reaper -------------------------------------------------------------------------
    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            try:
                self.reap()
            except StoreUnavailable:
                pass  # Redis is away; the API answers 503 meanwhile
            except Exception:
                log.warning("reaper failed", exc_info=True)

    @unavailable_on_redis_errors
    def reap(self) -> None:
        now = time.time()
        for raw in self.redis.zrangebyscore(QUEUED, 0, now - self.settings.queue_timeout_s):
            task_id = raw.decode()
            fail_task(self.store, task_id, "timeout", ABANDON_MESSAGES["timeout"], (TaskStatus.queued,))
            self.redis.zrem(QUEUED, task_id)
            self.redis.delete(PAYLOAD.format(task_id))
        for raw in self.redis.smembers(RUNNING):
            task_id = raw.decode()
            record = self.store.get(task_id)
            if record is None or record.status.terminal:
                self.redis.srem(RUNNING, task_id)
                continue
            if not self.redis.exists(ALIVE.format(task_id)):
                # killed, also between taking the task and marking it running
                fail_task(self.store, task_id, "worker_lost", WORKER_LOST)
                self.redis.srem(RUNNING, task_id)
            elif record.status is TaskStatus.running and record.started_at and now - record.started_at > self.settings.run_timeout_s:
                fail_task(self.store, task_id, "timeout", ABANDON_MESSAGES["timeout"], (TaskStatus.running,))
                self.redis.set(STOP.format(task_id), "timeout", px=int(self.settings.run_timeout_s * 2000))
