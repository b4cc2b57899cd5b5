"""`m2fp worker`: a Celery worker whose processes each load the model once.

Each worker process publishes its model info (for `/v1/model`, `/v1/labels` and
readiness) and, while a task runs, a liveness key: the API's reaper fails a task
whose worker stopped signalling (killed, out of memory) instead of leaving it
`running` forever. Celery replaces a process that grew past the memory bound.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery.signals import worker_process_init

from ..engine import HumanParser
from ..settings import Settings
from .model_card import ModelCard
from .celery_app import (ALIVE, PACE, PAYLOAD, QUEUE, QUEUED, RUNNING, STOP, TASK_NAME, WORKER, make_celery)
from .task import TaskOptions, TaskStatus
from .pacing import PACE_WINDOW
from .redis_store import RedisStore
from .run import fail_task, run_task

log = logging.getLogger("m2fp.worker")
HEARTBEAT_S = 2.0

settings = Settings()
app = make_celery(settings) if settings.broker_url else None
_state: dict = {}


def _heartbeat() -> None:
    name = f"{socket.gethostname()}-{os.getpid()}"
    store: RedisStore = _state["store"]
    parser: HumanParser = _state["parser"]
    doc = ModelCard.of(parser).to_json()
    ttl_ms = int(settings.worker_lost_after_s * 1000)
    while True:
        try:
            store.redis.set(WORKER.format(name), doc, px=ttl_ms)
            task_id = _state.get("task_id")
            if task_id:
                store.redis.set(ALIVE.format(task_id), name, px=ttl_ms)
        except Exception:  # Redis away for a moment: keep trying
            log.warning("heartbeat failed", exc_info=True)
        time.sleep(HEARTBEAT_S)


@worker_process_init.connect
def _load_model(**_) -> None:
    _state["store"] = RedisStore.from_settings(settings)
    parser = HumanParser.from_settings(settings)
    parser.warm_up()
    _state["parser"] = parser
    threading.Thread(target=_heartbeat, name="m2fp-heartbeat", daemon=True).start()
    log.info("worker process %d ready: %s", os.getpid(), parser.info)


def parse(task_id: str, options: dict) -> None:
    store: RedisStore = _state["store"]
    r = store.redis
    # registered as running (and alive) before the upload is taken, so that a crash at
    # any point leaves a trace the API's reaper resolves
    _state["task_id"] = task_id
    r.sadd(RUNNING, task_id)
    r.set(ALIVE.format(task_id), "starting", px=int(settings.worker_lost_after_s * 1000))
    payload = r.getdel(PAYLOAD.format(task_id))
    r.zrem(QUEUED, task_id)
    started = time.monotonic()

    def should_stop() -> str | None:
        reason = r.get(STOP.format(task_id))
        if reason:
            return reason.decode()
        return "timeout" if time.monotonic() - started > settings.run_timeout_s else None

    try:
        if payload is None:  # cancelled, timed out or expired while queued
            fail_task(store, task_id, "timeout", "The upload expired before a worker took it.",
                      (TaskStatus.queued,))
            return
        run_task(_state["parser"], store, task_id, payload,
                 TaskOptions(outputs=tuple(options["outputs"]), overlay_alpha=options["overlay_alpha"]),
                 should_stop)
        # the pace the API processes' Retry-After is planned from
        pipe = r.pipeline()
        pipe.lpush(PACE, time.monotonic() - started)
        pipe.ltrim(PACE, 0, PACE_WINDOW - 1)
        pipe.pexpire(PACE, max(1, int(settings.result_ttl_s * 1000)))  # like every key, it expires
        pipe.execute()
    finally:
        _state["task_id"] = None
        r.srem(RUNNING, task_id)
        r.delete(ALIVE.format(task_id), STOP.format(task_id))


if app is not None:
    app.task(name=TASK_NAME, ignore_result=True)(parse)


def main() -> None:
    if app is None:
        raise SystemExit("m2fp worker needs M2FP_BROKER_URL (a Redis URL)")
    app.worker_main(argv=["worker", f"--concurrency={settings.worker_concurrency}", "--pool=prefork",
                          "--loglevel=INFO", "--without-gossip", "--without-mingle", "-Q", QUEUE])
