"""The running service: settings, store, executor, metrics and the one warm model.

The model loads in the background after start-up, so `/healthz` answers at once and
`/readyz` says 503 until the model is loaded and warmed. Inference slots are sized
to the memory budget from the idle RSS measured after the warm-up.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import psutil

from ..engine import HumanParser, ModelInfo
from ..engine.images import ImageLimits, probe_image
from ..engine.preprocess import network_size
from ..model import M2FPConfig
from ..errors import (Draining, M2FPError, ModelUnavailable, NotFound, NotLoaded, QueueFull, ResultNotReady,
                      StoreUnavailable)
from .executor import InProcessExecutor
from .task import (Holding, Refusal, TaskHandle, TaskOptions, TaskRecord, TaskStatus, content_key,
                           new_task_id)
from .store import MemoryStore, TaskStore
from ..metrics import Metrics
from ..settings import Settings
from .memory_plan import MB, MemoryPlan

log = logging.getLogger("m2fp.service")

SWEEP_INTERVAL_S = 30


@dataclass(frozen=True)
class RemoteModel:
    """What the routes need of the model when it lives in the workers (cluster mode):
    the same `info`, `config` and `limits` a HumanParser has."""

    info: ModelInfo
    config: M2FPConfig
    limits: ImageLimits

    @classmethod
    def from_worker(cls, doc: dict, settings: Settings) -> "RemoteModel":
        info = doc["info"]
        info["classes"] = tuple(info["classes"])
        return cls(ModelInfo(**info), M2FPConfig.from_model_section(doc["model"]),
                   ImageLimits(max_pixels=settings.max_pixels, min_side=settings.min_side))


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


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cluster = bool(settings.broker_url)
        if self.cluster:
            from .celery_app import store_url
            from .celery_executor import CeleryExecutor
            from .redis_store import RedisStore

            self.store: TaskStore = RedisStore(
                store_url(settings), ttl_s=settings.result_ttl_s, max_finished=settings.max_results,
                unfinished_ttl_s=settings.queue_timeout_s + settings.run_timeout_s)
            self.executor = CeleryExecutor(self.store, settings)
        else:
            self.store = MemoryStore(ttl_s=settings.result_ttl_s, max_finished=settings.max_results,
                                     max_output_bytes=int(settings.max_result_mb * MB))
            self.executor = InProcessExecutor(
                self.store, slots=0, queue_size=settings.queue_size,
                queue_timeout_s=settings.queue_timeout_s, run_timeout_s=settings.run_timeout_s)
        self.metrics = Metrics(depth=self.executor.depth, in_flight=self.executor.in_flight)
        self.executor.on_finished = self.metrics.task_finished
        self.parser: HumanParser | None = None
        self.memory_plan: MemoryPlan | None = None  # in-process: sized once the model is warm
        self.load_error: ModelUnavailable | None = None
        self.started_at = time.time()
        self._stop = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self.cluster:
            self.executor.start()  # the reaper; the model lives in the workers
        else:
            threading.Thread(target=self._load, name="m2fp-load", daemon=True).start()
        threading.Thread(target=self._sweep_loop, name="m2fp-sweep", daemon=True).start()

    def _load(self) -> None:
        try:
            parser = HumanParser.from_settings(self.settings)
            parser.warm_up()
        except ModelUnavailable as exc:
            self.load_error = exc
            log.error("model unavailable: %s", exc.message)
            return
        except Exception:
            log.exception("model failed to load")
            self.load_error = ModelUnavailable("The model failed to load; see the service log.")
            return
        idle = psutil.Process().memory_info().rss
        self.memory_plan = MemoryPlan.for_service(self.settings, idle)
        self.executor.slots = self.memory_plan.slots
        self.executor.start(parser)
        self.parser = parser
        info = parser.info
        log.info("ready: model %s (pretrained=%s, %s, %d threads), %d slot(s), idle RSS %d MB, "
                 "%.1f s after start", info.id, info.pretrained, info.backend, info.threads,
                 self.executor.slots, idle // MB, time.time() - self.started_at)
        if not info.pretrained:
            log.warning("model %s is a STAND-IN with random weights: results are not real parses", info.id)

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
        self._stop.set()
        log.info("drained")

    # -- state ----------------------------------------------------------------------
    def require_ready(self) -> HumanParser | RemoteModel:
        """The model (its info, config and limits), or the error saying why there is none."""
        if self.executor.draining:
            raise Draining("The service is shutting down; try another instance.")
        if self.cluster:
            workers = self.executor.workers()  # StoreUnavailable (503) when Redis is away
            if not workers:
                raise NotLoaded("No worker is running yet; start `m2fp worker`.")
            return RemoteModel.from_worker(workers[0], self.settings)
        if self.parser is None:
            if self.load_error is not None:
                raise self.load_error
            raise NotLoaded("The model is still loading; retry shortly.")
        return self.parser

    # -- tasks: what a submission, a read and a delete may do -------------------------
    def submit(self, payload: bytes, options: TaskOptions, owner: str | None) -> Holding:
        """Admission control, then the identical live work of the same owner if there is
        some (shared, under a handle of its own), else new work on the queue."""
        try:
            model = self.require_ready()
            _, width, height = probe_image(payload, model.limits)
            network_size(width, height, model.config)  # refuses extreme aspect ratios now, not later
            if self.memory_plan is not None:
                self.memory_plan.admit(width, height)  # a photo its task's memory cannot hold
            key = content_key(payload, options, model.info.id, owner)
            task_id = new_task_id()
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
        except M2FPError as exc:
            self.metrics.rejected.labels(code=exc.code).inc()
            raise

    def submit_item(self, payload: bytes, options: TaskOptions, owner: str | None) -> Holding | Refusal:
        """A batch item: a bad or refused photo fails its own item only."""
        try:
            return self.submit(payload, options, owner)
        except M2FPError as exc:
            return Refusal(id=new_task_id(), code=exc.code, message=exc.message,
                           retry_after_s=exc.retry_after_s if isinstance(exc, QueueFull) else None)

    def task(self, task_id: str, owner: str | None) -> Holding:
        """The caller's task: another owner's is as unknown as one that never existed."""
        held = self.store.lookup(task_id)
        if held is None or held.handle.owner != owner:
            raise NotFound("No such task (it may have expired).")
        return held

    def output(self, task_id: str, owner: str | None, name: str) -> bytes:
        work = self.task(task_id, owner).work
        if work.status is not TaskStatus.succeeded:
            raise ResultNotReady(f"The task is {work.status.value}; results exist once it has succeeded.")
        if name not in work.options.outputs:
            raise NotFound(f"`{name}` was not requested for this task.")
        data = self.store.get_output(work.id, name)
        if data is None:
            raise NotFound("No such task (it may have expired).")
        return data

    def delete_task(self, task_id: str, owner: str | None) -> None:
        """Let go of the caller's handle only. Work nobody else holds is cancelled (queued:
        now; running: at its next stage boundary) or, when finished, forgotten."""
        self.task(task_id, owner)
        orphan = self.store.release(task_id)
        if orphan is not None:
            self.executor.cancel(orphan.id)
