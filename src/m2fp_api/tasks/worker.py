"""`m2fp worker`: a Celery worker whose pool processes each load every model of
`M2FP_MODELS` once, and run each task on the model it names.

Nothing is built at import. `main()` reads the settings and builds the Celery app with
its one task; each pool process builds its own resources when it starts (Celery's
`worker_process_init`, after the fork): the store, the queue, the models and a
heartbeat. The heartbeat publishes the process's ModelCards, one per model (for
`/v1/models`, `/v1/model`, `/v1/labels`, readiness and the `model` field) and, while a task runs, its liveness: the API's reaper
fails a task whose worker stopped signalling (killed, out of memory) instead of leaving
it `running` forever. Celery replaces a process that grew past the memory bound.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery.signals import worker_process_init

from ..errors import M2FPError, TimedOut
from ..settings import Settings
from .celery_app import QUEUE, TASK_NAME, make_celery
from .model_card import LoadedModels, cards_to_json
from .redis_queue import RedisQueue
from .redis_store import RedisStore
from .run import fail_task, run_task
from .task import TaskOptions, TaskOutcome, TaskStatus

log = logging.getLogger("m2fp.worker")
HEARTBEAT_S = 2.0


class WorkerProcess:
    """One pool process: its store, queue and models, and the task it is running."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = RedisStore.from_settings(settings)
        self.queue = RedisQueue(self.store.redis, settings)
        self.models = LoadedModels.load(settings)
        self.cards = cards_to_json(self.models.cards)
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.task_id: str | None = None
        threading.Thread(target=self._heartbeat, name="m2fp-heartbeat", daemon=True).start()
        log.info("worker process %d ready: %s", os.getpid(), [card.info for card in self.models.cards])

    def _heartbeat(self) -> None:
        while True:
            try:
                self.queue.heartbeat(self.name, self.cards, self.task_id)
            except Exception:  # Redis away for a moment: keep trying
                log.warning("heartbeat failed", exc_info=True)
            time.sleep(HEARTBEAT_S)

    def _report(self, outcome: TaskOutcome) -> None:
        """For the API processes' metrics; losing one report must not fail the task."""
        try:
            self.queue.report(outcome)
        except Exception:
            log.warning("reporting a task's outcome failed", exc_info=True)

    def parse(self, task_id: str, options: TaskOptions) -> None:
        self.task_id = task_id
        payload = self.queue.take(task_id)
        started = time.monotonic()

        def should_stop() -> str | None:
            reason = self.queue.stop_reason(task_id)
            if reason:
                return reason
            return "timeout" if time.monotonic() - started > self.settings.run_timeout_s else None

        try:
            if payload is None:  # cancelled, timed out or expired while queued
                fail_task(self.store, task_id, TimedOut("The upload expired before a worker took it."),
                          (TaskStatus.queued,))
                return
            try:
                parser = self.models.parser(options.model)
            except M2FPError as exc:  # a worker started with other M2FP_MODELS than the API's
                fail_task(self.store, task_id, exc, (TaskStatus.queued,))
                return
            run_task(parser, self.store, task_id, payload, options, should_stop,
                     on_finished=self._report)
            self.queue.record_run(time.monotonic() - started)  # the pace Retry-After is planned from
        finally:
            self.task_id = None
            self.queue.done(task_id)


class Worker:
    """`m2fp worker`'s Celery app and its task. The app exists before the pool forks;
    each pool process then builds its WorkerProcess."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = make_celery(settings)
        self.process: WorkerProcess | None = None

        def parse(task_id: str, options: dict) -> None:
            self.process.parse(task_id, TaskOptions.from_dict(options))

        self.app.task(name=TASK_NAME, ignore_result=True)(parse)
        worker_process_init.connect(self._init_process, weak=False)

    def _init_process(self, **_) -> None:
        self.process = WorkerProcess(self.settings)

    def run(self) -> None:
        self.app.worker_main(argv=["worker", f"--concurrency={self.settings.worker_concurrency}",
                                   "--pool=prefork", "--loglevel=INFO", "--without-gossip",
                                   "--without-mingle", "-Q", QUEUE])


def main() -> None:
    settings = Settings()
    if not settings.broker_url:
        raise SystemExit("m2fp worker needs M2FP_BROKER_URL (a Redis URL)")
    Worker(settings).run()
