"""Pydantic models of the HTTP contract (shared/API.md). Every response is typed so
that `/openapi.json` generates working SDKs."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, Field

from ..jobs.models import OUTPUT_FILES, Stage, TaskRecord, TaskStatus
from ..schemas import ParseResultOut


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. queue_full")
    message: str = Field(description="what went wrong, for a person")


class ErrorBody(BaseModel):
    error: ErrorDetail


class TaskLinks(BaseModel):
    self: str
    events: str
    mask: str | None = None
    overlay: str | None = None
    labels: str | None = None
    parts: str | None = None


class Task(BaseModel):
    id: str
    status: TaskStatus
    stage: Stage
    progress: float = Field(ge=0, le=1)
    queue_position: int | None = Field(None, description="1 = next to run; only while queued")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = Field(None, description="when a finished task and its outputs are forgotten")
    cached: bool = Field(False, description="true when an earlier identical submission answered this one")
    error: ErrorDetail | None = None
    result: ParseResultOut | None = None
    links: TaskLinks

    @classmethod
    def from_record(cls, record: TaskRecord, *, queue_position: int | None = None,
                    cached: bool = False) -> "Task":
        base = f"/v1/tasks/{record.id}"
        links = {"self": base, "events": f"{base}/events"}
        if record.status is TaskStatus.succeeded:
            links.update({name: f"{base}/{OUTPUT_FILES[name]}" for name in record.options.outputs})
        return cls(
            id=record.id, status=record.status, stage=record.stage,
            progress=round(record.progress, 4),
            queue_position=queue_position if record.status is TaskStatus.queued else None,
            created_at=_time(record.created_at), started_at=_time(record.started_at),
            finished_at=_time(record.finished_at), expires_at=_time(record.expires_at),
            cached=cached,
            error=ErrorDetail(code=record.error_code, message=record.error_message or "")
            if record.error_code else None,
            result=record.result, links=TaskLinks(**links))


def _time(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class TaskList(BaseModel):
    tasks: list[Task]


class Label(BaseModel):
    id: int
    name: str
    color: list[int] = Field(min_length=3, max_length=3, description="[r, g, b]")


class ModelInfoOut(BaseModel):
    id: str
    revision: str | None
    classes: list[str]
    pretrained: bool = Field(description="false for a stand-in with random weights")
    backend: str
    dtype: str
    threads: int
    single_human: bool
    slots: int = Field(description="concurrent inferences")
    rss_bytes: int = Field(description="resident memory of the service process now")
    memory_budget_bytes: int
    max_upload_bytes: int = Field(description="largest request body accepted")
    max_pixels: int = Field(description="largest photo accepted, in pixels")


class Health(BaseModel):
    status: str
