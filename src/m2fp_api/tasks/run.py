"""One task's work, whatever runs it (the in-process executor or a Celery worker):
decode -> parse -> render -> store. Every outcome ends in the store as a terminal
status; nothing escapes as an exception."""

from __future__ import annotations

import logging
import time
from typing import Callable

from ..engine import HumanParser
from ..engine.memory import release_free_memory, release_if_large, trimmed_when_idle
from ..errors import CodedError, M2FPError, OutOfMemory, ShutDown, TaskFailure, TimedOut
from ..outputs import render_outputs
from .task import Stage, TaskOptions, TaskOutcome, TaskStatus
from .store import TaskStore

log = logging.getLogger("m2fp.tasks")

# Returns why the work should stop ("cancelled", "timeout", "shutdown") or None.
StopCheck = Callable[[], "str | None"]
RENDER_PROGRESS = 0.92


class TaskAbandoned(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# what a task abandoned for each of these reasons fails with ("cancelled" is no failure)
STOP_FAILURES: dict[str, type[TaskFailure]] = {"timeout": TimedOut, "shutdown": ShutDown}


def run_task(parser: HumanParser, store: TaskStore, task_id: str, payload: bytes,
             options: TaskOptions, should_stop: StopCheck,
             on_finished: Callable[[TaskOutcome], None] | None = None) -> None:
    """Run one task to a terminal status in `store`, then tell `on_finished` how it ended."""
    running = (TaskStatus.running,)

    def check() -> None:
        reason = should_stop()
        if reason:
            raise TaskAbandoned(reason)

    def on_stage(stage: str, progress: float) -> None:
        check()
        store.update(task_id, if_status=running, stage=Stage(stage), progress=progress)

    with trimmed_when_idle():  # the rest is given back once tasks stop
        result = decoded = None
        status = TaskStatus.failed
        try:
            if not store.update(task_id, if_status=(TaskStatus.queued,), status=TaskStatus.running,
                                stage=Stage.decoding, started_at=time.time()):
                return  # cancelled or expired while waiting
            on_stage(Stage.decoding.value, 0.0)
            decoded = parser.decode(payload)
            result = parser.parse(decoded, on_stage=on_stage)
            on_stage(Stage.rendering.value, RENDER_PROGRESS)
            t0 = time.perf_counter()
            outputs, doc = render_outputs(result, decoded.image, options.outputs, options.overlay_alpha,
                                          parser.info, options.masks)
            doc["timings_ms"]["rendering"] = round((time.perf_counter() - t0) * 1000, 2)
            check()
            store.put_outputs(task_id, outputs)
            if store.update(task_id, if_status=running, status=TaskStatus.succeeded, stage=Stage.done,
                            progress=1.0, result=doc, finished_at=time.time()):
                status = TaskStatus.succeeded
        except TaskAbandoned as stop:
            if stop.reason == "cancelled":
                status = TaskStatus.cancelled
                store.update(task_id, status=TaskStatus.cancelled, finished_at=time.time())
            else:
                fail_task(store, task_id, STOP_FAILURES[stop.reason]())
        except M2FPError as exc:
            fail_task(store, task_id, exc)
        except MemoryError:
            fail_task(store, task_id, OutOfMemory())
        except Exception:
            log.exception("task failed unexpectedly", extra={"task_id": task_id})
            fail_task(store, task_id, TaskFailure())
        finally:
            if decoded is None:  # failed or never decoded: nothing the next task reuses
                release_free_memory()
            else:
                release_if_large(decoded.size[0] * decoded.size[1])  # full-size maps
            if on_finished is not None:
                on_finished(TaskOutcome(status, dict(result.timings_ms) if status is TaskStatus.succeeded else {}))


def fail_task(store: TaskStore, task_id: str, error: CodedError,
              if_status: tuple[TaskStatus, ...] = (TaskStatus.queued, TaskStatus.running)) -> None:
    """End a task as failed with `error`, unless it has already ended (or is not in `if_status`)."""
    store.update(task_id, if_status=if_status, status=TaskStatus.failed, error_code=error.code,
                 error_message=error.message, finished_at=time.time())
