"""Where tasks and their outputs live: an interface, and the embedded in-memory store.

The routes only talk to `TaskStore`, so a Redis-backed store slots in without them
changing. Two kinds of things are kept: work (`TaskRecord`: one run of the model and
its outputs, what executors see) and handles (`TaskHandle`: one per submission, the id
a client sees). Identical submissions share work, each through its own handle; work
lives while a handle holds it. Finished work expires after a TTL, and the number of
handles on finished work and the bytes of outputs are bounded (least recently used go
first), so the store never grows without bound. Idempotency-Keys point to a handle and
live as long as it does.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from typing import Protocol

from ..webhooks.subscription import Subscription
from .task import Holding, IdempotencyClaim, TaskHandle, TaskRecord, TaskStatus

# an Idempotency-Key whose handle does not exist (yet) is held this long by the request
# that claimed it (it is creating the handle); after that, the key is free again
CLAIM_GRACE_S = 10.0


class TaskStore(Protocol):
    def create(self, record: TaskRecord, handle: TaskHandle) -> None:
        """New work with its first handle."""

    def share(self, key: str, handle_id: str, owner: str | None) -> Holding | None:
        """Hold the live work (queued, running, or succeeded and unexpired) with this
        content key through a new handle; None when there is none, or when it is unfinished
        and already held by as many handles as finished work may keep."""

    def lookup(self, handle_id: str) -> Holding | None:
        """The handle and its work, or None if either is unknown or expired."""

    def release(self, handle_id: str) -> TaskRecord | None:
        """A handle's DELETE. On finished work (or cancelled already) the handle is
        forgotten, and the work with it if it was the last to hold it. On unfinished work
        the handle lets go and reads `cancelled` from then on; when no other handle holds
        the work any more, the work is returned (and no longer shared) for the caller to
        cancel."""

    def get(self, task_id: str) -> TaskRecord | None:
        """The work, or None if it is unknown or expired."""

    def update(self, task_id: str, *, if_status: tuple[TaskStatus, ...] | None = None,
               **changes) -> TaskRecord | None:
        """Apply changes to the work atomically and return the new record. None, and no
        change, if it is gone or its status is not in `if_status`. Work reaching a terminal
        status gets its expiry time (and is forgotten if no handle holds it)."""

    def put_webhook(self, handle_id: str, webhook: Subscription) -> None:
        """Keep a handle's webhook and its deliveries so far (nothing if the handle is gone)."""

    def put_outputs(self, task_id: str, outputs: dict[str, bytes]) -> None: ...

    def get_output(self, task_id: str, name: str) -> bytes | None: ...

    def delete(self, task_id: str) -> None:
        """Forget the work, its outputs and every handle on it."""

    def sweep(self) -> int:
        """Drop expired work; returns how many."""

    def claim(self, scope: str, claim: IdempotencyClaim) -> IdempotencyClaim | None:
        """Take the Idempotency-Key `scope` for `claim`, atomically, and return None; or,
        when another claim holds it (its handle lives, or it is under CLAIM_GRACE_S old),
        return that one and change nothing."""

    def unclaim(self, scope: str, handle_id: str) -> None:
        """Free the key, if `handle_id`'s claim still holds it (its submission failed)."""


class MemoryStore:
    def __init__(self, *, ttl_s: float, max_finished: int, max_output_bytes: int) -> None:
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.max_output_bytes = max_output_bytes
        self._lock = threading.Lock()
        # least recently used first, both
        self._tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self._handles: OrderedDict[str, TaskHandle] = OrderedDict()
        self._holders: dict[str, set[str]] = {}  # work id -> handle ids
        self._outputs: dict[str, dict[str, bytes]] = {}
        self._by_key: dict[str, str] = {}
        self._claims: dict[str, IdempotencyClaim] = {}
        self._output_bytes = 0

    # -- interface --------------------------------------------------------------------
    def create(self, record: TaskRecord, handle: TaskHandle) -> None:
        with self._lock:
            self._tasks[record.id] = record
            self._by_key[record.key] = record.id
            self._hold(handle)

    def share(self, key: str, handle_id: str, owner: str | None) -> Holding | None:
        with self._lock:
            work_id = self._by_key.get(key)
            record = self._live(work_id) if work_id else None
            if record is None or record.status in (TaskStatus.failed, TaskStatus.cancelled):
                return None
            if not record.status.terminal and len(self._holders[work_id]) >= self.max_finished:
                return None
            handle = TaskHandle(id=handle_id, work_id=work_id, owner=owner, cached=True)
            self._hold(handle)
            self._tasks.move_to_end(work_id)
            self._enforce_bounds()
            return Holding(handle, record) if handle_id in self._handles else None

    def lookup(self, handle_id: str) -> Holding | None:
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is None:
                return None
            if handle.cancelled is not None:
                if handle.cancelled.expires_at <= time.time():
                    self._drop_handle(handle_id)
                    return None
                view = handle.cancelled
            else:
                view = self._live(handle.work_id)
                if view is None:
                    return None
                self._tasks.move_to_end(handle.work_id)
            self._handles.move_to_end(handle_id)
            return Holding(handle, view)

    def release(self, handle_id: str) -> TaskRecord | None:
        with self._lock:
            handle = self._handles.get(handle_id)
            record = self._live(handle.work_id) if handle else None
            if handle is None or handle.cancelled is not None or record is None or record.status.terminal:
                self._drop_handle(handle_id)
                return None
            handle.cancel(record, self.ttl_s)
            holders = self._holders[record.id]
            holders.discard(handle_id)
            self._handles.move_to_end(handle_id)
            self._enforce_bounds()
            if holders:
                return None
            # nobody waits for the work any more: not shared again, and the caller cancels it
            del self._holders[record.id]
            if self._by_key.get(record.key) == record.id:
                del self._by_key[record.key]
            return record

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            return self._live(task_id)

    def update(self, task_id: str, *, if_status: tuple[TaskStatus, ...] | None = None,
               **changes) -> TaskRecord | None:
        with self._lock:
            record = self._live(task_id)
            if record is None or (if_status is not None and record.status not in if_status):
                return None
            for name, value in changes.items():
                setattr(record, name, value)
            if record.status.terminal and record.expires_at is None:
                record.finished_at = record.finished_at or time.time()
                record.expires_at = record.finished_at + self.ttl_s
            record.version += 1
            if record.status.terminal and not self._holders.get(task_id):
                self._forget(task_id)  # nobody is left to read it
            self._enforce_bounds()
            return record

    def put_webhook(self, handle_id: str, webhook: Subscription) -> None:
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is not None:
                handle.webhook = copy.deepcopy(webhook)  # a snapshot, as Redis keeps

    def put_outputs(self, task_id: str, outputs: dict[str, bytes]) -> None:
        with self._lock:
            if task_id not in self._tasks:
                return
            self._drop_outputs(task_id)
            self._outputs[task_id] = dict(outputs)
            self._output_bytes += sum(len(v) for v in outputs.values())
            self._enforce_bounds()

    def get_output(self, task_id: str, name: str) -> bytes | None:
        with self._lock:
            if self._live(task_id) is None:
                return None
            return self._outputs.get(task_id, {}).get(name)

    def delete(self, task_id: str) -> None:
        with self._lock:
            self._forget(task_id)

    def sweep(self) -> int:
        with self._lock:
            now = time.time()
            expired = [t for t, r in self._tasks.items() if r.expires_at is not None and r.expires_at <= now]
            for task_id in expired:
                self._forget(task_id)
            for handle_id in [h.id for h in self._handles.values()
                              if h.cancelled is not None and h.cancelled.expires_at <= now]:
                self._drop_handle(handle_id)
            for scope in [s for s, c in self._claims.items() if not self._holds(c)]:
                del self._claims[scope]
            return len(expired)

    def claim(self, scope: str, claim: IdempotencyClaim) -> IdempotencyClaim | None:
        with self._lock:
            held = self._claims.get(scope)
            if held is not None and self._holds(held):
                return held
            self._claims[scope] = claim
            return None

    def unclaim(self, scope: str, handle_id: str) -> None:
        with self._lock:
            if (held := self._claims.get(scope)) is not None and held.handle_id == handle_id:
                del self._claims[scope]

    # -- internals (lock held) --------------------------------------------------------
    def _holds(self, claim: IdempotencyClaim) -> bool:
        if time.time() - claim.at < CLAIM_GRACE_S:
            return True
        handle = self._handles.get(claim.handle_id)
        if handle is None:
            return False
        if handle.cancelled is not None:
            return handle.cancelled.expires_at > time.time()
        return self._live(handle.work_id) is not None

    def _live(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        if record is not None and record.expires_at is not None and record.expires_at <= time.time():
            self._forget(task_id)
            return None
        return record

    def _hold(self, handle: TaskHandle) -> None:
        self._handles[handle.id] = handle
        self._holders.setdefault(handle.work_id, set()).add(handle.id)

    def _drop_handle(self, handle_id: str) -> None:
        """Forget a handle whose view is finished; finished work goes with its last handle."""
        handle = self._handles.pop(handle_id, None)
        if handle is None or handle.cancelled is not None:
            return
        holders = self._holders.get(handle.work_id, set())
        holders.discard(handle_id)
        record = self._tasks.get(handle.work_id)
        if not holders and record is not None and record.status.terminal:
            self._forget(record.id)

    def _finished_view(self, handle: TaskHandle) -> bool:
        record = self._tasks.get(handle.work_id)
        return handle.cancelled is not None or record is None or record.status.terminal

    def _drop_outputs(self, task_id: str) -> None:
        old = self._outputs.pop(task_id, None)
        if old:
            self._output_bytes -= sum(len(v) for v in old.values())

    def _forget(self, task_id: str) -> None:
        record = self._tasks.pop(task_id, None)
        self._drop_outputs(task_id)
        for handle_id in self._holders.pop(task_id, ()):
            self._handles.pop(handle_id, None)
        if record is not None and self._by_key.get(record.key) == task_id:
            del self._by_key[record.key]

    def _enforce_bounds(self) -> None:
        """Evict least recently used handles on finished work (or cancelled) past the count
        bound (work goes with its last handle), then least recently used finished work past the byte
        bound. Unfinished work is never evicted: the executor's queue bounds it."""
        finished = [h.id for h in self._handles.values() if self._finished_view(h)]
        for handle_id in finished[:max(0, len(finished) - self.max_finished)]:
            self._drop_handle(handle_id)
        for task_id in [t for t, r in self._tasks.items() if r.status.terminal]:
            if self._output_bytes <= self.max_output_bytes:
                break
            self._forget(task_id)
