"""The task store on Redis, shared by API processes and workers.

Keys (prefix `m2fp:`): `task:{id}` (the record as JSON), `out:{id}:{name}` (output
bytes), `key:{content key}` (de-duplication index), `finished` (sorted set for the
count bound). Every write sets an expiry computed from the record, so TTLs survive
every update: queued and running tasks expire after the longest they could take plus
the result TTL, finished ones after the result TTL. Redis being unreachable, loading
or out of memory becomes `StoreUnavailable` (HTTP 503), never a 500.
"""

from __future__ import annotations

import functools
import json
import time

import redis

from .models import TaskRecord, TaskStatus
from .store import StoreUnavailable

P = "m2fp:"


def unavailable_on_redis_errors(fn):
    """Redis unreachable, loading, out of memory or read-only -> StoreUnavailable (503)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        except redis.ResponseError as exc:
            if "OOM" in str(exc) or "MISCONF" in str(exc) or "READONLY" in str(exc):
                raise StoreUnavailable("store refused the write") from None
            raise
    return wrapped


class RedisStore:
    def __init__(self, url: str, *, ttl_s: float, max_finished: int, unfinished_ttl_s: float) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                          health_check_interval=10)
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.unfinished_ttl_s = unfinished_ttl_s

    # -- helpers ------------------------------------------------------------------------
    def _ttl_ms(self, record: TaskRecord) -> int:
        if record.expires_at is not None:
            return max(1, int((record.expires_at - time.time()) * 1000))
        return int((self.unfinished_ttl_s + self.ttl_s) * 1000)

    @staticmethod
    def _encode(record: TaskRecord) -> str:
        return json.dumps(record.to_dict())

    # -- interface --------------------------------------------------------------------
    @unavailable_on_redis_errors
    def create(self, record: TaskRecord) -> None:
        ttl = self._ttl_ms(record)
        pipe = self.redis.pipeline()
        pipe.set(P + f"task:{record.id}", self._encode(record), px=ttl)
        pipe.set(P + f"key:{record.key}", record.id, px=ttl)
        if record.status.terminal:
            pipe.zadd(P + "finished", {record.id: record.finished_at or time.time()})
        pipe.execute()

    @unavailable_on_redis_errors
    def get(self, task_id: str) -> TaskRecord | None:
        raw = self.redis.get(P + f"task:{task_id}")
        return TaskRecord.from_dict(json.loads(raw)) if raw else None

    @unavailable_on_redis_errors
    def update(self, task_id: str, *, if_status: tuple[TaskStatus, ...] | None = None,
               **changes) -> TaskRecord | None:
        key = P + f"task:{task_id}"
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if not raw:
                        return None
                    record = TaskRecord.from_dict(json.loads(raw))
                    if if_status is not None and record.status not in if_status:
                        return None
                    for name, value in changes.items():
                        setattr(record, name, value)
                    finishing = record.status.terminal and record.expires_at is None
                    if finishing:
                        record.finished_at = record.finished_at or time.time()
                        record.expires_at = record.finished_at + self.ttl_s
                    record.version += 1
                    ttl = self._ttl_ms(record)
                    pipe.multi()
                    pipe.set(key, self._encode(record), px=ttl)
                    pipe.pexpire(P + f"key:{record.key}", ttl)
                    if finishing:
                        pipe.zadd(P + "finished", {task_id: record.finished_at})
                        for name in record.options.outputs:
                            pipe.pexpire(P + f"out:{task_id}:{name}", ttl)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue  # someone else wrote first: read again
        if finishing:
            self._enforce_bound()
        return record

    @unavailable_on_redis_errors
    def put_outputs(self, task_id: str, outputs: dict[str, bytes]) -> None:
        record = self.get(task_id)
        if record is None:
            return
        ttl = self._ttl_ms(record)
        pipe = self.redis.pipeline()
        for name, data in outputs.items():
            pipe.set(P + f"out:{task_id}:{name}", data, px=ttl)
        pipe.execute()

    @unavailable_on_redis_errors
    def get_output(self, task_id: str, name: str) -> bytes | None:
        return self.redis.get(P + f"out:{task_id}:{name}")

    @unavailable_on_redis_errors
    def delete(self, task_id: str) -> None:
        record = self.get(task_id)
        pipe = self.redis.pipeline()
        pipe.delete(P + f"task:{task_id}")
        pipe.zrem(P + "finished", task_id)
        if record is not None:
            pipe.delete(*(P + f"out:{task_id}:{n}" for n in record.options.outputs))
            pipe.delete(P + f"key:{record.key}")
        pipe.execute()

    @unavailable_on_redis_errors
    def find_by_key(self, key: str) -> TaskRecord | None:
        task_id = self.redis.get(P + f"key:{key}")
        record = self.get(task_id.decode()) if task_id else None
        if record is None or record.status in (TaskStatus.failed, TaskStatus.cancelled):
            return None
        return record

    @unavailable_on_redis_errors
    def sweep(self) -> int:
        """Keys expire by themselves; this only trims the index of finished tasks."""
        return self.redis.zremrangebyscore(P + "finished", 0, time.time() - self.ttl_s)

    def _enforce_bound(self) -> None:
        excess = self.redis.zcard(P + "finished") - self.max_finished
        if excess > 0:
            for task_id, _ in self.redis.zpopmin(P + "finished", excess):
                self.delete(task_id.decode())

    @unavailable_on_redis_errors
    def ping(self) -> None:
        self.redis.ping()
