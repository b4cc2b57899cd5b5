"""The task store on Redis, shared by API processes and workers.

Keys (prefix `m2fp:`): `work:{id}` (the work's record as JSON), `out:{id}:{name}` (output
bytes), `holders:{id}` (the ids of the handles on the work), `task:{id}` (a handle as
JSON), `key:{content key}` (de-duplication index: the work's id), `finished` (sorted set
of handles on finished work, by the work's expiry, for the count bound), `idem:{scope}`
(an Idempotency-Key's claim, as JSON; it holds while its handle exists). Every write
sets an expiry computed from the work's record on all of the work's keys, handles
included, so TTLs survive every update: unfinished work expires after the longest it
could take plus the result TTL, finished work after the result TTL. Redis being
unreachable, loading or out of memory becomes `StoreUnavailable` (HTTP 503), never a 500.
"""

from __future__ import annotations

import functools
import json
import time

import redis

from ..errors import StoreUnavailable
from ..settings import Settings
from ..webhooks.subscription import Subscription
from .store import CLAIM_GRACE_S
from .task import Holding, IdempotencyClaim, TaskHandle, TaskRecord, TaskStatus

P = "m2fp:"
FINISHED = P + "finished"


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


def _work(task_id: str) -> str:
    return P + f"work:{task_id}"


def _holders(task_id: str) -> str:
    return P + f"holders:{task_id}"


def _handle(handle_id: str) -> str:
    return P + f"task:{handle_id}"


def _index(key: str) -> str:
    return P + f"key:{key}"


def _output(task_id: str, name: str) -> str:
    return P + f"out:{task_id}:{name}"


def _claim(scope: str) -> str:
    return P + f"idem:{scope}"


class RedisStore:
    def __init__(self, url: str, *, ttl_s: float, max_finished: int, unfinished_ttl_s: float) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                          health_check_interval=10)
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.unfinished_ttl_s = unfinished_ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> "RedisStore":
        """The store API processes and workers share (`M2FP_STORE_URL`, else the broker's Redis)."""
        return cls(settings.store_url or settings.broker_url, ttl_s=settings.result_ttl_s,
                   max_finished=settings.max_results,
                   unfinished_ttl_s=settings.queue_timeout_s + settings.run_timeout_s)

    # -- helpers ------------------------------------------------------------------------
    def _ttl_ms(self, record: TaskRecord) -> int:
        if record.expires_at is not None:
            return max(1, int((record.expires_at - time.time()) * 1000))
        return int((self.unfinished_ttl_s + self.ttl_s) * 1000)

    @staticmethod
    def _encode(record: TaskRecord | TaskHandle) -> str:
        return json.dumps(record.to_dict())

    def _read_work(self, client, task_id: str) -> TaskRecord | None:
        raw = client.get(_work(task_id))
        return TaskRecord.from_dict(json.loads(raw)) if raw else None

    def _read_handle(self, client, handle_id: str) -> TaskHandle | None:
        raw = client.get(_handle(handle_id))
        return TaskHandle.from_dict(json.loads(raw)) if raw else None

    def _transaction(self, body):
        """Run `body(pipe)` as an optimistic transaction (it WATCHes what it reads, then
        MULTI), again whenever someone else wrote a watched key first."""
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    return body(pipe)
                except redis.WatchError:
                    pipe.reset()

    def _forget_in(self, pipe, record: TaskRecord, holders: set[str], index_owner: bytes | None) -> None:
        """Queue the deletion of the work, its outputs, its handles and (if it still points
        to this work) its de-duplication index entry."""
        pipe.delete(_work(record.id), _holders(record.id),
                    *(_output(record.id, n) for n in record.options.outputs),
                    *(_handle(h) for h in holders))
        if holders:
            pipe.zrem(FINISHED, *holders)
        if index_owner == record.id.encode():
            pipe.delete(_index(record.key))

    # -- interface --------------------------------------------------------------------
    @unavailable_on_redis_errors
    def create(self, record: TaskRecord, handle: TaskHandle) -> None:
        ttl = self._ttl_ms(record)
        pipe = self.redis.pipeline()
        pipe.set(_work(record.id), self._encode(record), px=ttl)
        pipe.set(_handle(handle.id), self._encode(handle), px=ttl)
        pipe.sadd(_holders(record.id), handle.id)
        pipe.pexpire(_holders(record.id), ttl)
        pipe.set(_index(record.key), record.id, px=ttl)
        pipe.execute()

    @unavailable_on_redis_errors
    def share(self, key: str, handle_id: str, owner: str | None) -> Holding | None:
        def attach(pipe) -> Holding | None:
            pipe.watch(_index(key))
            work_id = pipe.get(_index(key))
            if not work_id:
                return None
            work_id = work_id.decode()
            pipe.watch(_work(work_id), _holders(work_id))
            record = self._read_work(pipe, work_id)
            if record is None or record.status in (TaskStatus.failed, TaskStatus.cancelled):
                return None
            if not record.status.terminal and pipe.scard(_holders(work_id)) >= self.max_finished:
                return None
            handle = TaskHandle(id=handle_id, work_id=work_id, owner=owner, cached=True)
            ttl = self._ttl_ms(record)
            pipe.multi()
            pipe.set(_handle(handle_id), self._encode(handle), px=ttl)
            pipe.sadd(_holders(work_id), handle_id)
            pipe.pexpire(_holders(work_id), ttl)
            if record.status.terminal:
                pipe.zadd(FINISHED, {handle_id: record.expires_at})
            pipe.execute()
            return Holding(handle, record)

        held = self._transaction(attach)
        if held is not None and held.work.status.terminal:
            self._enforce_bound()
        return held

    @unavailable_on_redis_errors
    def lookup(self, handle_id: str) -> Holding | None:
        handle = self._read_handle(self.redis, handle_id)
        if handle is None:
            return None
        view = handle.cancelled or self._read_work(self.redis, handle.work_id)
        return Holding(handle, view) if view else None

    @unavailable_on_redis_errors
    def release(self, handle_id: str) -> TaskRecord | None:
        released = self._let_go(handle_id)
        self._enforce_bound()
        return released

    def _let_go(self, handle_id: str) -> TaskRecord | None:
        def let_go(pipe) -> TaskRecord | None:
            pipe.watch(_handle(handle_id))
            handle = self._read_handle(pipe, handle_id)
            if handle is None:
                return None
            if handle.cancelled is not None:
                pipe.multi()
                pipe.delete(_handle(handle_id))
                pipe.zrem(FINISHED, handle_id)
                pipe.execute()
                return None
            pipe.watch(_work(handle.work_id), _holders(handle.work_id))
            record = self._read_work(pipe, handle.work_id)
            others = {h.decode() for h in pipe.smembers(_holders(handle.work_id))} - {handle_id}
            index_owner = None
            if record is not None and not others:
                pipe.watch(_index(record.key))
                index_owner = pipe.get(_index(record.key))
            pipe.multi()
            pipe.srem(_holders(handle.work_id), handle_id)
            if record is None or record.status.terminal:
                pipe.delete(_handle(handle_id))
                pipe.zrem(FINISHED, handle_id)
                if record is not None and not others:
                    self._forget_in(pipe, record, set(), index_owner)
                pipe.execute()
                return None
            handle.cancel(record, self.ttl_s)
            pipe.set(_handle(handle_id), self._encode(handle), px=self._ttl_ms(handle.cancelled))
            pipe.zadd(FINISHED, {handle_id: handle.cancelled.expires_at})
            if not others and index_owner == record.id.encode():
                pipe.delete(_index(record.key))  # nobody waits for it any more: not shared again
            pipe.execute()
            return None if others else record

        return self._transaction(let_go)

    @unavailable_on_redis_errors
    def get(self, task_id: str) -> TaskRecord | None:
        return self._read_work(self.redis, task_id)

    @unavailable_on_redis_errors
    def update(self, task_id: str, *, if_status: tuple[TaskStatus, ...] | None = None,
               **changes) -> TaskRecord | None:
        def write(pipe) -> tuple[TaskRecord | None, bool]:
            pipe.watch(_work(task_id), _holders(task_id))
            record = self._read_work(pipe, task_id)
            if record is None or (if_status is not None and record.status not in if_status):
                return None, False
            for name, value in changes.items():
                setattr(record, name, value)
            finishing = record.status.terminal and record.expires_at is None
            if finishing:
                record.finished_at = record.finished_at or time.time()
                record.expires_at = record.finished_at + self.ttl_s
            record.version += 1
            holders = {h.decode() for h in pipe.smembers(_holders(task_id))}
            index_owner = pipe.get(_index(record.key)) if record.status.terminal and not holders else None
            ttl = self._ttl_ms(record)
            pipe.multi()
            if record.status.terminal and not holders:
                self._forget_in(pipe, record, holders, index_owner)  # nobody is left to read it
                pipe.execute()
                return record, False
            pipe.set(_work(task_id), self._encode(record), px=ttl)
            pipe.pexpire(_index(record.key), ttl)
            pipe.pexpire(_holders(task_id), ttl)
            for handle_id in holders:
                pipe.pexpire(_handle(handle_id), ttl)
            if finishing:
                pipe.zadd(FINISHED, {h: record.expires_at for h in holders})
                for name in record.options.outputs:
                    pipe.pexpire(_output(task_id, name), ttl)
            pipe.execute()
            return record, finishing

        record, finished = self._transaction(write)
        if finished:
            self._enforce_bound()
        return record

    @unavailable_on_redis_errors
    def put_webhook(self, handle_id: str, webhook: Subscription) -> None:
        def write(pipe) -> None:
            pipe.watch(_handle(handle_id))
            handle = self._read_handle(pipe, handle_id)
            if handle is None:
                return
            handle.webhook = webhook
            pipe.multi()
            pipe.set(_handle(handle_id), self._encode(handle), keepttl=True)  # it expires with its work
            pipe.execute()

        self._transaction(write)

    @unavailable_on_redis_errors
    def put_outputs(self, task_id: str, outputs: dict[str, bytes]) -> None:
        record = self.get(task_id)
        if record is None:
            return
        ttl = self._ttl_ms(record)
        pipe = self.redis.pipeline()
        for name, data in outputs.items():
            pipe.set(_output(task_id, name), data, px=ttl)
        pipe.execute()

    @unavailable_on_redis_errors
    def get_output(self, task_id: str, name: str) -> bytes | None:
        return self.redis.get(_output(task_id, name))

    @unavailable_on_redis_errors
    def delete(self, task_id: str) -> None:
        def forget(pipe) -> None:
            pipe.watch(_work(task_id), _holders(task_id))
            record = self._read_work(pipe, task_id)
            if record is None:
                pipe.multi()
                pipe.delete(_holders(task_id))
                pipe.execute()
                return
            holders = {h.decode() for h in pipe.smembers(_holders(task_id))}
            index_owner = pipe.get(_index(record.key))
            pipe.multi()
            self._forget_in(pipe, record, holders, index_owner)
            pipe.execute()

        self._transaction(forget)

    @unavailable_on_redis_errors
    def sweep(self) -> int:
        """Keys expire by themselves; this only trims the index of handles on finished work."""
        return self.redis.zremrangebyscore(FINISHED, 0, time.time())

    @unavailable_on_redis_errors
    def claim(self, scope: str, claim: IdempotencyClaim) -> IdempotencyClaim | None:
        def take(pipe) -> IdempotencyClaim | None:
            pipe.watch(_claim(scope))
            raw = pipe.get(_claim(scope))
            held = IdempotencyClaim.from_json(raw) if raw else None
            if held is not None and (time.time() - held.at < CLAIM_GRACE_S
                                     or pipe.exists(_handle(held.handle_id))):
                return held
            pipe.multi()
            # no handle outlives this: the longest a task can wait and run, then its TTL
            pipe.set(_claim(scope), claim.to_json(), px=int((self.unfinished_ttl_s + self.ttl_s) * 1000))
            pipe.execute()
            return None

        return self._transaction(take)

    @unavailable_on_redis_errors
    def unclaim(self, scope: str, handle_id: str) -> None:
        def free(pipe) -> None:
            pipe.watch(_claim(scope))
            raw = pipe.get(_claim(scope))
            if raw and IdempotencyClaim.from_json(raw).handle_id == handle_id:
                pipe.multi()
                pipe.delete(_claim(scope))
                pipe.execute()

        self._transaction(free)

    def _enforce_bound(self) -> None:
        self.sweep()
        excess = self.redis.zcard(FINISHED) - self.max_finished
        if excess > 0:
            for handle_id, _ in self.redis.zpopmin(FINISHED, excess):
                self._let_go(handle_id.decode())  # finished views: forgotten
