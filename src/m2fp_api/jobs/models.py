"""What a task is, independent of where it is stored or run."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

OUTPUT_NAMES = ("mask", "overlay", "labels", "parts")
# file name under /v1/tasks/{id}/ for each output
OUTPUT_FILES = {"mask": "mask.png", "overlay": "overlay.png", "labels": "labels.png",
                "parts": "parts.json"}


class TaskStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.succeeded, TaskStatus.failed, TaskStatus.cancelled)


class Stage(str, Enum):
    queued = "queued"
    decoding = "decoding"
    preprocessing = "preprocessing"
    inference = "inference"
    postprocessing = "postprocessing"
    rendering = "rendering"
    done = "done"


@dataclass(frozen=True)
class TaskOptions:
    outputs: tuple[str, ...] = OUTPUT_NAMES
    overlay_alpha: float = 0.5


def content_key(payload: bytes, options: TaskOptions, model_id: str) -> str:
    """Identical bytes with identical options on the same model give the same result."""
    digest = hashlib.sha256(payload)
    digest.update(repr((sorted(options.outputs), round(options.overlay_alpha, 4), model_id)).encode())
    return digest.hexdigest()


def new_task_id() -> str:
    return uuid.uuid4().hex


@dataclass
class TaskRecord:
    id: str
    options: TaskOptions
    key: str
    status: TaskStatus = TaskStatus.queued
    stage: Stage = Stage.queued
    progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None
    # bumped on every change, so watchers (SSE) can tell that something happened
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"], d["stage"] = self.status.value, self.stage.value
        d["options"] = {"outputs": list(self.options.outputs),
                        "overlay_alpha": self.options.overlay_alpha}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskRecord":
        d = dict(d)
        d["status"], d["stage"] = TaskStatus(d["status"]), Stage(d["stage"])
        o = d["options"]
        d["options"] = TaskOptions(outputs=tuple(o["outputs"]), overlay_alpha=float(o["overlay_alpha"]))
        return cls(**d)
