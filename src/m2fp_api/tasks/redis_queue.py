"""The cluster's queue in Redis, beside the Celery broker: what API processes (enqueue,
cancel, reap, pace) and workers (take, report, publish) do to its keys, each written
once.

Only task ids travel through the broker. Keys (prefix `m2fp:`): `payload:{id}` (the
upload, until a worker takes it; expires with the queue time limit), `queued` (sorted
set: task id -> enqueue time; depth, positions, queue timeouts), `running` (set of the
task ids workers have taken), `alive:{id}` (refreshed by the worker running the task),
`stop:{id}` (why a running task should stop: "cancelled", "timeout"), `worker:{name}` (a
worker process's ModelCards, one per model it runs, refreshed while it lives), `pace` (the latest run times in
seconds, newest first), `booked_until` (the moment the last refused client was promised
a place), `outcomes` (how the workers' runs ended, newest first, until an API process
collects them for its metrics). Every key expires.
"""

from __future__ import annotations

import random
import time

import redis

from ..settings import Settings
from .pacing import PACE_WINDOW, RETRY_AFTER_MAX_S, book
from .redis_store import unavailable_on_redis_errors
from .task import TaskOutcome

PAYLOAD = "m2fp:payload:{}"
QUEUED = "m2fp:queued"
RUNNING = "m2fp:running"
ALIVE = "m2fp:alive:{}"
STOP = "m2fp:stop:{}"
WORKER = "m2fp:worker:{}"
WORKERS = "m2fp:worker:*"
PACE = "m2fp:pace"
BOOKED_UNTIL = "m2fp:booked_until"
OUTCOMES = "m2fp:outcomes"
# outcomes kept for collection at most: when no API process collects them (none runs),
# the oldest go first
OUTCOMES_KEPT = 10_000
OUTCOMES_COLLECTED_AT_ONCE = 500


class RedisQueue:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.payload_ttl_ms = int(settings.queue_timeout_s * 1000)
        # a worker that stops signalling for this long is lost, with its task
        self.alive_ttl_ms = int(settings.worker_lost_after_s * 1000)
        self.stop_ttl_ms = int(settings.run_timeout_s * 2000)
        self.pace_ttl_ms = max(1, int(settings.result_ttl_s * 1000))

    # -- the queue ----------------------------------------------------------------------
    @unavailable_on_redis_errors
    def enqueue(self, task_id: str, payload: bytes) -> None:
        pipe = self.redis.pipeline()
        pipe.set(PAYLOAD.format(task_id), payload, px=self.payload_ttl_ms)
        pipe.zadd(QUEUED, {task_id: time.time()})
        pipe.execute()

    @unavailable_on_redis_errors
    def remove(self, task_id: str) -> None:
        """Out of the queue, upload dropped: a worker that receives the id skips it."""
        pipe = self.redis.pipeline()
        pipe.zrem(QUEUED, task_id)
        pipe.delete(PAYLOAD.format(task_id))
        pipe.execute()

    @unavailable_on_redis_errors
    def take(self, task_id: str) -> bytes | None:
        """A worker's: the upload, out of the queue (None when it was removed or expired).
        The task is registered as running and alive first, so that a crash at any point
        leaves a trace the API's reaper resolves."""
        pipe = self.redis.pipeline()
        pipe.sadd(RUNNING, task_id)
        pipe.set(ALIVE.format(task_id), "starting", px=self.alive_ttl_ms)
        pipe.execute()
        pipe.getdel(PAYLOAD.format(task_id))
        pipe.zrem(QUEUED, task_id)
        return pipe.execute()[0]

    @unavailable_on_redis_errors
    def done(self, task_id: str) -> None:
        """A worker's, once the task's run is over whatever its outcome."""
        pipe = self.redis.pipeline()
        pipe.srem(RUNNING, task_id)
        pipe.delete(ALIVE.format(task_id), STOP.format(task_id))
        pipe.execute()

    @unavailable_on_redis_errors
    def depth(self) -> int:
        return self.redis.zcard(QUEUED)

    @unavailable_on_redis_errors
    def position(self, task_id: str) -> int | None:
        rank = self.redis.zrank(QUEUED, task_id)
        return None if rank is None else rank + 1

    @unavailable_on_redis_errors
    def queued_before(self, moment: float) -> list[str]:
        return [raw.decode() for raw in self.redis.zrangebyscore(QUEUED, 0, moment)]

    # -- running tasks ------------------------------------------------------------------
    @unavailable_on_redis_errors
    def running(self) -> list[str]:
        return [raw.decode() for raw in self.redis.smembers(RUNNING)]

    @unavailable_on_redis_errors
    def running_count(self) -> int:
        return self.redis.scard(RUNNING)

    @unavailable_on_redis_errors
    def forget_running(self, task_id: str) -> None:
        self.redis.srem(RUNNING, task_id)

    @unavailable_on_redis_errors
    def alive(self, task_id: str) -> bool:
        return bool(self.redis.exists(ALIVE.format(task_id)))

    @unavailable_on_redis_errors
    def stop(self, task_id: str, reason: str, *, keep_earlier: bool = False) -> None:
        """Tell the worker running the task to stop at its next stage boundary."""
        self.redis.set(STOP.format(task_id), reason, nx=keep_earlier, px=self.stop_ttl_ms)

    @unavailable_on_redis_errors
    def stop_reason(self, task_id: str) -> str | None:
        reason = self.redis.get(STOP.format(task_id))
        return reason.decode() if reason else None

    # -- workers ------------------------------------------------------------------------
    @unavailable_on_redis_errors
    def heartbeat(self, worker: str, cards: bytes, task_id: str | None) -> None:
        """A worker process is alive, with these models, and so is the task it runs."""
        pipe = self.redis.pipeline()
        pipe.set(WORKER.format(worker), cards, px=self.alive_ttl_ms)
        if task_id:
            pipe.set(ALIVE.format(task_id), worker, px=self.alive_ttl_ms)
        pipe.execute()

    @unavailable_on_redis_errors
    def worker_cards(self) -> list[bytes]:
        """The ModelCards (cards_to_json) of each live worker process."""
        keys = list(self.redis.scan_iter(WORKERS, count=100))
        return [card for card in (self.redis.mget(keys) if keys else []) if card]

    # -- pace ---------------------------------------------------------------------------
    @unavailable_on_redis_errors
    def record_run(self, seconds: float) -> None:
        pipe = self.redis.pipeline()
        pipe.lpush(PACE, seconds)
        pipe.ltrim(PACE, 0, PACE_WINDOW - 1)
        pipe.pexpire(PACE, self.pace_ttl_ms)  # like every key, it expires
        pipe.execute()

    @unavailable_on_redis_errors
    def recent_runs(self) -> list[float]:
        return [float(s) for s in self.redis.lrange(PACE, 0, -1)]

    @unavailable_on_redis_errors
    def book(self, interval_s: float, rng: random.Random) -> int:
        """A refused client's Retry-After, from one line of promises shared by every API
        process (see pacing)."""
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(BOOKED_UNTIL)
                    booking = book(time.time(), float(pipe.get(BOOKED_UNTIL) or 0), interval_s, rng)
                    pipe.multi()
                    pipe.set(BOOKED_UNTIL, booking.booked_until, px=RETRY_AFTER_MAX_S * 1000)
                    pipe.execute()
                    return booking.retry_after_s
                except redis.WatchError:
                    continue

    # -- outcomes -----------------------------------------------------------------------
    @unavailable_on_redis_errors
    def report(self, outcome: TaskOutcome) -> None:
        """A worker's, for each run: how it ended."""
        pipe = self.redis.pipeline()
        pipe.lpush(OUTCOMES, outcome.to_json())
        pipe.ltrim(OUTCOMES, 0, OUTCOMES_KEPT - 1)
        pipe.pexpire(OUTCOMES, self.pace_ttl_ms)
        pipe.execute()

    @unavailable_on_redis_errors
    def collect(self) -> list[TaskOutcome]:
        """The outcomes reported since the last collection, oldest first. Popping is atomic,
        so with several API processes each outcome is collected by exactly one."""
        outcomes: list[TaskOutcome] = []
        while batch := self.redis.rpop(OUTCOMES, OUTCOMES_COLLECTED_AT_ONCE):
            outcomes.extend(TaskOutcome.from_json(raw) for raw in batch)
            if len(batch) < OUTCOMES_COLLECTED_AT_ONCE:
                break
        return outcomes
