"""What a task is, independent of where it is stored or run."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from ..engine import ModelInfo
from ..errors import BadRequest
from ..outputs import default_outputs, unavailable_outputs
from ..result_json import MaskFormat
from ..webhooks.subscription import Subscription


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
    # None until submission fills in what the model writes by default (`for_model`)
    outputs: tuple[str, ...] | None = None
    overlay_alpha: float = 0.5
    masks: MaskFormat = MaskFormat.none
    # the id of the model to run on; None (as a request leaves it) is the service's
    # default, which the service core names before the task is stored or run
    model: str | None = None

    def for_model(self, model: ModelInfo) -> "TaskOptions":
        """These options as `model` runs them: the model named, the default outputs filled
        in; BadRequest for an output it cannot write or masks nothing would carry."""
        outputs = default_outputs(model) if self.outputs is None else self.outputs
        unavailable = unavailable_outputs(outputs, model)
        if unavailable:
            raise BadRequest(f"{', '.join(unavailable)}: not available from the single-person "
                             f"model {model.id}.")
        if self.masks is not MaskFormat.none and "parts" not in outputs:
            raise BadRequest("masks go into parts.json: ask for the `parts` output too.")
        return replace(self, outputs=outputs, model=model.id)

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": list(self.outputs), "overlay_alpha": self.overlay_alpha, "masks": self.masks.value,
                "model": self.model}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskOptions":
        # tasks stored by an older release (in Redis across an upgrade) have neither field
        return cls(outputs=tuple(d["outputs"]), overlay_alpha=float(d["overlay_alpha"]),
                   masks=MaskFormat(d.get("masks", MaskFormat.none.value)), model=d.get("model"))


def content_key(payload: bytes, options: TaskOptions, owner: str | None) -> str:
    """Identical bytes with identical options (the model among them, named by the core)
    give the same result. The
    owner (API key) is part of the key: sharing work across keys would tell one key's
    clients, by a `cached: true`, what another key's clients have uploaded."""
    digest = hashlib.sha256(payload)
    digest.update(repr((sorted(options.outputs), round(options.overlay_alpha, 4), options.masks.value,
                        options.model, owner)).encode())
    return digest.hexdigest()


def idempotency_scope(key: str, owner: str | None, item: int | None = None) -> str:
    """Where a client's `Idempotency-Key` is kept: per owner (two API keys may pick the
    same key without meeting), per endpoint, and per item of a batch."""
    return hashlib.sha256(json.dumps([owner, key, item]).encode()).hexdigest()


def new_task_id() -> str:
    return uuid.uuid4().hex


@dataclass
class TaskRecord:
    """The work: one run of the model, and its outputs, shared by the identical
    submissions that hold it (`TaskHandle`). Executors and workers know only this."""

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
        d["options"] = self.options.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskRecord":
        d = dict(d)
        d["status"], d["stage"] = TaskStatus(d["status"]), Stage(d["stage"])
        d["options"] = TaskOptions.from_dict(d["options"])
        return cls(**d)


@dataclass
class TaskHandle:
    """One submission's hold on some work: the task id its client sees, and whose it is.
    Identical submissions share the work and its outputs but never the handle: each has
    its own, and its DELETE acts on it only. The work's first handle has the work's id.

    A handle cancelled while its work is unfinished lets go of the work (which is
    cancelled only when no other handle holds it) and keeps its own view of it from
    then on: `cancelled`, the work as it was, ended as cancelled."""

    id: str
    work_id: str
    owner: str | None = None  # the API key's owner id; None when no keys are configured
    cached: bool = False  # true when it joined work an earlier submission started
    created_at: float = field(default_factory=time.time)
    cancelled: TaskRecord | None = None
    webhook: Subscription | None = None  # what this submission asked to be told, and how it went

    def cancel(self, work: TaskRecord, ttl_s: float) -> None:
        now = time.time()
        self.cancelled = replace(work, status=TaskStatus.cancelled, finished_at=now, expires_at=now + ttl_s,
                                 result=None, version=work.version + 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cancelled"] = self.cancelled.to_dict() if self.cancelled else None
        d["webhook"] = self.webhook.to_dict() if self.webhook else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskHandle":
        d = dict(d)
        d["cancelled"] = TaskRecord.from_dict(d["cancelled"]) if d.get("cancelled") else None
        d["webhook"] = Subscription.from_dict(d["webhook"]) if d.get("webhook") else None
        return cls(**d)


@dataclass(frozen=True)
class Holding:
    """A handle and the work as it sees it (its own view once cancelled), read together."""

    handle: TaskHandle
    work: TaskRecord
    replayed: bool = False  # the answer to a retry with the same Idempotency-Key


@dataclass(frozen=True)
class IdempotencyClaim:
    """An Idempotency-Key taken by a submission: the handle it answers with, and the
    content key of the request that took it (a retry must send the same)."""

    handle_id: str
    content_key: str
    at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "IdempotencyClaim":
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Refusal:
    """A batch item refused at submission. It is kept nowhere (refused items must not
    displace accepted work in the store's bounds): the batch answer is its only record."""

    id: str
    code: str
    message: str
    at: float = field(default_factory=time.time)
    retry_after_s: int | None = None  # set when refused for capacity: when to resubmit it


@dataclass(frozen=True)
class TaskOutcome:
    """How one run of a task ended, for the metrics: its terminal status and, when it
    succeeded, the engine's time per stage."""

    status: TaskStatus
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"status": self.status.value, "timings_ms": self.timings_ms})

    @classmethod
    def from_json(cls, raw: str | bytes) -> "TaskOutcome":
        d = json.loads(raw)
        return cls(TaskStatus(d["status"]), d["timings_ms"])
