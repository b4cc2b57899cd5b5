"""The service core: what a submission, a read, a wait and a delete may do, whatever runs
the tasks. It owns admission, de-duplication, idempotent retries and the roll-back of
work the executor would not take; the routes only parse requests and shape answers.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

from ..engine.images import probe_image
from ..engine.preprocess import network_size
from ..errors import (Draining, IdempotencyKeyInProgress, IdempotencyKeyReused, M2FPError, NotFound, QueueFull,
                      ResultNotReady, StoreUnavailable)
from ..metrics import Metrics
from ..settings import Settings
from ..webhooks.dispatcher import WebhookDispatcher
from ..webhooks.subscription import Subscription
from .executor import Executor
from .model_card import ModelCard, card_named
from .modes import store_and_executor
from .store import TaskStore
from .task import (Holding, IdempotencyClaim, Refusal, TaskHandle, TaskOptions, TaskRecord, TaskStatus,
                   content_key, idempotency_scope, new_task_id)

log = logging.getLogger("m2fp.service")

SWEEP_INTERVAL_S = 30
# how often a waiting submission, and an event stream, look at the task again
POLL_INTERVAL_S = 0.05
EVENT_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class TaskView:
    """A task as its client sees it now: its handle, the work and its place in the queue."""

    held: Holding
    queue_position: int | None  # 1 = next to run; None unless queued


@dataclass
class BatchOutcome:
    """The items of one batch, accepted (held work) or refused, in upload order."""

    items: list[Holding | Refusal] = field(default_factory=list)

    @property
    def capacity_refused(self) -> list[Refusal]:
        return [i for i in self.items if isinstance(i, Refusal) and i.retry_after_s is not None]

    @property
    def retry_after_s(self) -> int | None:
        """When every item refused for capacity may be resubmitted (each booked its place)."""
        return max((i.retry_after_s for i in self.capacity_refused), default=None)

    def raise_if_nothing_fits(self) -> None:
        """A batch of which no item got in for want of room is refused whole (503)."""
        if self.capacity_refused and not any(isinstance(i, Holding) for i in self.items):
            raise QueueFull("The queue has no room for any item of this batch; retry later.",
                            self.retry_after_s)

    def raise_if_key_reused(self) -> None:
        """A batch whose every item differs from the first batch sent with its
        Idempotency-Key is another request under a used key (422)."""
        if self.items and all(isinstance(i, Refusal) and i.code == IdempotencyKeyReused.code for i in self.items):
            raise IdempotencyKeyReused("This Idempotency-Key was used with other photos or other options; "
                                       "use a new key for a new request.")


class Service:
    def __init__(self, settings: Settings, store: TaskStore, executor: Executor) -> None:
        self.settings = settings
        self.store = store
        self.executor = executor
        self.metrics = Metrics(depth=executor.depth, in_flight=executor.in_flight)
        executor.on_finished = self.metrics.task_finished
        self.webhooks = WebhookDispatcher(settings, store)
        self._stop = threading.Event()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        return cls(settings, *store_and_executor(settings))

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.executor.start()
        self.webhooks.start()
        threading.Thread(target=self._sweep_loop, name="m2fp-sweep", daemon=True).start()

    def _sweep_loop(self) -> None:
        while not self._stop.wait(SWEEP_INTERVAL_S):
            try:
                self.store.sweep()
            except Exception:  # a store outage must not end the sweeper
                log.warning("sweeping expired tasks failed", exc_info=True)

    def drain(self) -> None:
        """Refuse new work, finish (or fail with `shutdown`) what is queued and running."""
        log.info("draining: up to %.0f s for queued and running tasks", self.settings.drain_timeout_s)
        self.executor.drain(self.settings.drain_timeout_s)
        self.webhooks.stop(grace_s=self.settings.webhook_timeout_s)
        self._stop.set()
        log.info("drained")

    @property
    def draining(self) -> bool:
        return self.executor.draining

    def still_running(self) -> bool:
        """After `drain`: whether work that cannot be interrupted still runs in this process."""
        return self.executor.still_running()

    @property
    def slots(self) -> int:
        return self.executor.slots

    # -- state ----------------------------------------------------------------------
    def models(self) -> tuple[ModelCard, ...]:
        """Every model (info, config and limits), the default first, or the error saying
        why there are none."""
        if self.executor.draining:
            raise Draining("The service is shutting down; try another instance.")
        return self.executor.models

    def require_ready(self, model: str | None = None) -> ModelCard:
        """The model of that id (None: the default), or the error saying why there is none
        (UnknownModel when this service has not loaded it)."""
        return card_named(self.models(), model)

    # -- tasks: what a submission, a read, a wait and a delete may do -------------------
    def submit(self, payload: bytes, options: TaskOptions, owner: str | None,
               idempotency_key: str | None = None, webhook: Subscription | None = None) -> Holding:
        """Admission control, then the identical live work of the same owner if there is
        some (shared, under a handle of its own), else new work on the queue. A retry with
        the `idempotency_key` of an earlier submission answers that submission's task (and
        keeps that submission's webhook). A webhook (checked beforehand with
        `webhooks.check`) is watched from here."""
        scope = None if idempotency_key is None else idempotency_scope(idempotency_key, owner)
        return self._with_webhook(self._submit(payload, options, owner, scope), webhook)

    def _with_webhook(self, held: Holding, webhook: Subscription | None) -> Holding:
        if webhook is None or held.replayed:
            return held
        self.store.put_webhook(held.handle.id, webhook)
        self.webhooks.watch(held.handle.id, webhook)
        return self.store.lookup(held.handle.id) or held

    def _submit(self, payload: bytes, options: TaskOptions, owner: str | None, scope: str | None) -> Holding:
        try:
            model = self.require_ready(options.model)
            options = options.for_model(model.info)  # the default model named: stored and run as such
            _, width, height = probe_image(payload, model.limits)
            network_size(width, height, model.config)  # refuses extreme aspect ratios now, not later
            self.executor.admit(width, height)  # a photo its task's memory cannot hold
            key = content_key(payload, options, owner)
            task_id = new_task_id()
            if scope is not None:
                claimed = self.store.claim(scope, IdempotencyClaim(handle_id=task_id, content_key=key))
                if claimed is not None:
                    return self._replay(claimed, key)
            try:
                return self._hold_work(payload, options, owner, key, task_id)
            except (M2FPError, StoreUnavailable):
                if scope is not None:
                    self.store.unclaim(scope, task_id)  # nothing was created: the key is free for a retry
                raise
        except M2FPError as exc:
            self.metrics.rejected.labels(code=exc.code).inc()
            raise

    def _hold_work(self, payload: bytes, options: TaskOptions, owner: str | None, key: str,
                   task_id: str) -> Holding:
        shared = self.store.share(key, task_id, owner)
        if shared is not None:
            return shared
        record = TaskRecord(id=task_id, options=options, key=key)
        handle = TaskHandle(id=task_id, work_id=task_id, owner=owner, created_at=record.created_at)
        self.store.create(record, handle)
        try:
            self.executor.submit(task_id, payload, options)
        except (M2FPError, StoreUnavailable):
            self.store.delete(task_id)
            raise
        return Holding(handle, record)

    def _replay(self, claimed: IdempotencyClaim, key: str) -> Holding:
        """The task of the submission that took the Idempotency-Key, if this is the same
        request again (same photo, options and model)."""
        if claimed.content_key != key:
            raise IdempotencyKeyReused("This Idempotency-Key was used with another photo or other options; "
                                       "use a new key for a new request.")
        held = self.store.lookup(claimed.handle_id)
        if held is None:  # the first request is still creating it
            raise IdempotencyKeyInProgress("A request with this Idempotency-Key is still being accepted; "
                                           "retry shortly.")
        self.metrics.replays.inc()
        return Holding(held.handle, held.work, replayed=True)

    async def submit_batch(self, payloads: AsyncIterable[bytes], options: TaskOptions,
                           owner: str | None, idempotency_key: str | None = None,
                           webhook: Subscription | None = None) -> BatchOutcome:
        """Each photo is submitted as it is read; a bad or refused one fails its own item
        only. A batch none of whose items found room is refused whole (QueueFull), and so is
        one for a model this service has not loaded (UnknownModel) or whose options the model
        cannot run (BadRequest).

        An `idempotency_key` stands for each item by its position: a retry of the batch
        answers the items accepted before with their tasks and submits the ones refused
        before (for capacity, say), as a client retrying a partly refused batch wants. An
        item that differs from its first submission fails on its own
        (`idempotency_key_reused`), and the batch whole when every item does."""
        options = options.for_model(self.require_ready(options.model).info)
        batch = BatchOutcome()
        async for payload in payloads:
            scope = (None if idempotency_key is None
                     else idempotency_scope(idempotency_key, owner, item=len(batch.items)))
            # each item is a task of its own, with deliveries of its own
            batch.items.append(self._submit_item(payload, options, owner, scope, copy.deepcopy(webhook)))
        batch.raise_if_nothing_fits()
        batch.raise_if_key_reused()
        return batch

    def _submit_item(self, payload: bytes, options: TaskOptions, owner: str | None,
                     scope: str | None, webhook: Subscription | None) -> Holding | Refusal:
        try:
            return self._with_webhook(self._submit(payload, options, owner, scope), webhook)
        except M2FPError as exc:
            return Refusal(id=new_task_id(), code=exc.code, message=exc.message,
                           retry_after_s=exc.retry_after_s if isinstance(exc, QueueFull) else None)

    def get(self, task_id: str, owner: str | None) -> Holding:
        """The caller's task: another owner's is as unknown as one that never existed."""
        held = self.store.lookup(task_id)
        if held is None or held.handle.owner != owner:
            raise NotFound("No such task (it may have expired).")
        return held

    def view(self, held: Holding) -> TaskView:
        position = self.executor.queue_position(held.work.id) if held.work.status is TaskStatus.queued else None
        return TaskView(held, position)

    async def wait(self, held: Holding, wait_s: float) -> Holding:
        """The task once it has ended, or as it is after `wait_s`."""
        end = time.monotonic() + wait_s
        while not held.work.status.terminal and time.monotonic() < end:
            await asyncio.sleep(POLL_INTERVAL_S)
            held = self.store.lookup(held.handle.id) or held
        return held

    async def watch(self, task_id: str) -> AsyncIterator[TaskView | None]:
        """The task each time it changes (its work or its place in the queue) until it
        ends; None, and the end, when it is gone (expired or deleted)."""
        last = None
        while True:
            held = self.store.lookup(task_id)
            if held is None:
                yield None
                return
            view = self.view(held)
            # read before yielding: the in-memory store's records change while the
            # consumer holds the view, and a task that ended then must still be sent
            snapshot, ended = (held.work.version, view.queue_position), held.work.status.terminal
            if snapshot != last:
                last = snapshot
                yield view
            if ended:
                return
            await asyncio.sleep(EVENT_POLL_INTERVAL_S)

    def output(self, task_id: str, owner: str | None, name: str) -> bytes:
        work = self.get(task_id, owner).work
        if work.status is not TaskStatus.succeeded:
            raise ResultNotReady(f"The task is {work.status.value}; results exist once it has succeeded.")
        if name not in work.options.outputs:
            raise NotFound(f"`{name}` was not requested for this task.")
        data = self.store.get_output(work.id, name)
        if data is None:
            raise NotFound("No such task (it may have expired).")
        return data

    def cancel(self, task_id: str, owner: str | None) -> None:
        """Let go of the caller's handle only. Work nobody else holds is cancelled (queued:
        now; running: at its next stage boundary) or, when finished, forgotten."""
        self.get(task_id, owner)
        orphan = self.store.release(task_id)
        if orphan is not None:
            self.executor.cancel(orphan.id)
