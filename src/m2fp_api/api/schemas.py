"""Pydantic models of the HTTP contract (shared/API.md). Every response is typed so
that `/openapi.json` generates working SDKs."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import urlencode

from pydantic import BaseModel, Field, create_model

from ..engine import ModelInfo
from ..outputs import OUTPUTS, Output, output_named
from ..result_json import ParseResultOut
from ..tasks.task import Holding, Refusal, Stage, TaskStatus
from ..webhooks.subscription import Subscription


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. queue_full")
    message: str = Field(description="what went wrong, for a person")


class ErrorBody(BaseModel):
    error: ErrorDetail


class _TaskUrls(BaseModel):
    self: str
    events: str


# and the URL of each output (set once the task has succeeded, for the outputs it asked for)
TaskLinks = create_model("TaskLinks", __base__=_TaskUrls,
                         **{output.name: (str | None, None) for output in OUTPUTS})


class DeliveryOut(BaseModel):
    event: str = Field(description="`started` or `completed`")
    attempts: int = Field(description="0 until the task reaches the event")
    delivered: bool = Field(description="the receiver answered 2xx")
    status_code: int | None = Field(None, description="the receiver's last answer")
    error: str | None = Field(None, description="why the last attempt got no answer, or was refused")
    last_attempt_at: datetime | None = None


class WebhookOut(BaseModel):
    url: str
    deliveries: list[DeliveryOut] = Field(description="one per event asked for")

    @classmethod
    def of(cls, subscription: Subscription) -> "WebhookOut":
        return cls(url=subscription.url, deliveries=[
            DeliveryOut(event=d.event, attempts=d.attempts, delivered=d.delivered, status_code=d.status_code,
                        error=d.error, last_attempt_at=_time(d.last_attempt_at))
            for d in subscription.deliveries])


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
    cached: bool = Field(False, description=(
        "true when this submission shares the work and outputs of an earlier identical one "
        "(its id is still its own)"))
    error: ErrorDetail | None = None
    retry_after_s: int | None = Field(None, description=(
        "on a batch item refused for capacity (`queue_full`): resubmit it after this many seconds"))
    result: ParseResultOut | None = None
    webhook: WebhookOut | None = Field(None, description="only when the submission gave one: its deliveries so far")
    links: TaskLinks

    @classmethod
    def from_holding(cls, held: Holding, *, queue_position: int | None = None) -> "Task":
        """A submission's view of the work it holds: its own id, time and `cached`."""
        record, handle = held.work, held.handle
        base = f"/v1/tasks/{handle.id}"
        links = {"self": base, "events": f"{base}/events"}
        if record.status is TaskStatus.succeeded:
            links.update({name: f"{base}/{output_named(name).file_name}" for name in record.options.outputs})
        return cls(
            id=handle.id, status=record.status, stage=record.stage,
            progress=round(record.progress, 4),
            queue_position=queue_position if record.status is TaskStatus.queued else None,
            created_at=_time(handle.created_at), started_at=_time(record.started_at),
            finished_at=_time(record.finished_at), expires_at=_time(record.expires_at),
            cached=handle.cached,
            error=ErrorDetail(code=record.error_code, message=record.error_message or "")
            if record.error_code else None,
            result=record.result, links=TaskLinks(**links),
            webhook=WebhookOut.of(handle.webhook) if handle.webhook else None)

    @classmethod
    def refused(cls, refusal: Refusal) -> "Task":
        """A refused batch item, failed from the start and kept nowhere: it expires as it
        is answered (its id then reads 404, like any expired task)."""
        base = f"/v1/tasks/{refusal.id}"
        at = _time(refusal.at)
        return cls(id=refusal.id, status=TaskStatus.failed, stage=Stage.queued, progress=0.0,
                   created_at=at, finished_at=at, expires_at=at,
                   error=ErrorDetail(code=refusal.code, message=refusal.message),
                   retry_after_s=refusal.retry_after_s,
                   links=TaskLinks(self=base, events=f"{base}/events"))


def _time(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class TaskList(BaseModel):
    tasks: list[Task]


class Label(BaseModel):
    id: int
    name: str
    color: list[int] = Field(min_length=3, max_length=3, description="[r, g, b]")


class OutputOut(BaseModel):
    name: str = Field(description="as in `outputs` and in a Task's `links`")
    file_name: str = Field(description="under /v1/tasks/{id}/")
    media_type: str
    title: str

    @classmethod
    def of(cls, output: Output) -> "OutputOut":
        return cls(name=output.name, file_name=output.file_name, media_type=output.media_type,
                   title=output.title)


class ModelFacts(BaseModel):
    id: str = Field(description="what a request's `model` field names")
    revision: str | None
    classes: list[str]
    pretrained: bool = Field(description="false for a stand-in with random weights")
    backend: str
    dtype: str
    threads: int
    single_human: bool = Field(description="true: one person a photo, `persons` in `parts.json` stays empty")

    @staticmethod
    def fields_of(info: ModelInfo) -> dict:
        return dict(id=info.id, revision=info.revision, classes=list(info.classes), pretrained=info.pretrained,
                    backend=info.backend, dtype=info.dtype, threads=info.threads, single_human=info.single_human)


class LoadedModel(ModelFacts):
    labels: str = Field(description="its classes with their colours (`GET` this URL)")

    @classmethod
    def of(cls, info: ModelInfo) -> "LoadedModel":
        return cls(**cls.fields_of(info), labels=f"/v1/labels?{urlencode({'model': info.id})}")


class ModelList(BaseModel):
    default: str = Field(description="the id of the model a request without `model` runs on")
    models: list[LoadedModel] = Field(description="every model loaded, the default first")


class ModelInfoOut(ModelFacts):
    """The default model, and the runtime."""

    slots: int = Field(description="concurrent inferences")
    rss_bytes: int = Field(description="resident memory of the service process now")
    memory_budget_bytes: int
    max_upload_bytes: int = Field(description="largest request body accepted")
    max_pixels: int = Field(description="largest photo accepted, in pixels")
    outputs: list[OutputOut] = Field(description="what a task on this model can produce, each at "
                                                 "/v1/tasks/{id}/{file_name}")


class Health(BaseModel):
    status: str
