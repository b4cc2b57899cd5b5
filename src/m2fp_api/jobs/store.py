"""Where tasks and their outputs live: an interface, and the embedded in-memory store.

The routes only talk to `TaskStore`, so a Redis-backed store slots in without them
changing. Finished tasks expire after a TTL, and the number of finished tasks and the
bytes of their outputs are bounded (least recently used go first), so the store
never grows without bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Protocol

from .models import TaskRecord, TaskStatus


class StoreUnavailable(Exception):
    """The backing store cannot be reached (a Redis store raises this)."""


class TaskStore(Protocol):
    def create(self, record: TaskRecord) -> None: ...

    def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None if it is unknown or expired."""

    def update(self, task_id: str, *, if_status: tuple[TaskStatus, ...] | None = None,
               **changes) -> TaskRecord | None:
        """Apply changes atomically and return the new record. None, and no change, if the
        task is gone or its status is not in `if_status`. A task reaching a terminal
        status gets its expiry time."""

    def put_outputs(self, task_id: str, outputs: dict[str, bytes]) -> None: ...

    def get_output(self, task_id: str, name: str) -> bytes | None: ...

    def delete(self, task_id: str) -> None:
        """Forget the task and its outputs."""

    def find_by_key(self, key: str) -> TaskRecord | None:
        """A live task (queued, running or succeeded and unexpired) with this content key."""

    def sweep(self) -> int:
        """Drop expired tasks; returns how many."""


class MemoryStore:
    def __init__(self, *, ttl_s: float, max_finished: int, max_output_bytes: int) -> None:
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.max_output_bytes = max_output_bytes
        self._lock = threading.Lock()
        self._tasks: OrderedDict[str, TaskRecord] = OrderedDict()  # least recently used first
        self._outputs: dict[str, dict[str, bytes]] = {}
        self._by_key: dict[str, str] = {}
        self._output_bytes = 0

    # -- interface --------------------------------------------------------------------
    def create(self, record: TaskRecord) -> None:
        with self._lock:
            self._tasks[record.id] = record
            self._by_key[record.key] = record.id
            self._enforce_bounds()

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            record = self._live(task_id)
            if record is not None:
                self._tasks.move_to_end(task_id)
            return record

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
            self._enforce_bounds()
            return record

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

    def find_by_key(self, key: str) -> TaskRecord | None:
        with self._lock:
            task_id = self._by_key.get(key)
            record = self._live(task_id) if task_id else None
            if record is None or record.status in (TaskStatus.failed, TaskStatus.cancelled):
                return None
            self._tasks.move_to_end(task_id)
            return record

    def sweep(self) -> int:
        with self._lock:
            now = time.time()
            expired = [t for t, r in self._tasks.items() if r.expires_at is not None and r.expires_at <= now]
            for task_id in expired:
                self._forget(task_id)
            return len(expired)

    # -- internals (lock held) --------------------------------------------------------
    def _live(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        if record is not None and record.expires_at is not None and record.expires_at <= time.time():
            self._forget(task_id)
            return None
        return record

    def _drop_outputs(self, task_id: str) -> None:
        old = self._outputs.pop(task_id, None)
        if old:
            self._output_bytes -= sum(len(v) for v in old.values())

    def _forget(self, task_id: str) -> None:
        record = self._tasks.pop(task_id, None)
        self._drop_outputs(task_id)
        if record is not None and self._by_key.get(record.key) == task_id:
            del self._by_key[record.key]

    def _enforce_bounds(self) -> None:
        """Evict least recently used finished tasks past the count or byte bounds.
        Queued and running tasks are never evicted: the executor's queue bounds them."""
        finished = [t for t, r in self._tasks.items() if r.status.terminal]
        excess = len(finished) - self.max_finished
        for task_id in finished:
            if excess <= 0 and self._output_bytes <= self.max_output_bytes:
                break
            self._forget(task_id)
            excess -= 1
