"""HTTP routes of shared/API.md. They talk to the store and the executor through their
interfaces only, so other implementations (Redis, Celery) slot in unchanged."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from .. import render
from ..engine.images import probe_image
from ..engine.preprocess import network_size
from ..errors import BadRequest, M2FPError, NotFound, NotReady
from ..jobs.models import (OUTPUT_FILES, OUTPUT_NAMES, TaskOptions, TaskRecord, TaskStatus,
                           content_key, new_task_id)
from ..jobs.store import StoreUnavailable
from ..jobs.work import fail_task
from .schemas import ErrorBody, Health, Label, ModelInfoOut, Task, TaskList
from .service import MB, Service

MAX_WAIT_S = 60.0
POLL_INTERVAL_S = 0.05
EVENT_POLL_INTERVAL_S = 0.1
# OpenAPI 3.1 marks uploads with contentMediaType only; generators (openapi-python-client
# among them) recognise a file by `format: binary`, so say both
BINARY = {"format": "binary"}
PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
       "description": "PNG image"}


def errors(*statuses: int) -> dict:
    return {s: {"model": ErrorBody} for s in statuses}


def service_of(request: Request) -> Service:
    return request.app.state.service


# API keys are checked by the Authenticate middleware (auth.py), before the body is read;
# `request.state.owner` names the caller's key
v1 = APIRouter(prefix="/v1", responses=errors(401))
ops = APIRouter()


# -- options --------------------------------------------------------------------------

def parse_options(outputs: str | None, overlay_alpha: float | None, wait: float | None) -> tuple[TaskOptions, float]:
    names = OUTPUT_NAMES
    if outputs is not None:
        names = tuple(dict.fromkeys(o.strip() for o in outputs.split(",") if o.strip()))
        unknown = [n for n in names if n not in OUTPUT_NAMES]
        if unknown or not names:
            raise BadRequest(f"outputs must be a comma list of {','.join(OUTPUT_NAMES)}.")
    alpha = 0.5 if overlay_alpha is None else overlay_alpha
    if not 0.0 <= alpha <= 1.0:
        raise BadRequest("overlay_alpha must be between 0 and 1.")
    wait_s = 0.0 if wait is None else wait
    if not 0.0 <= wait_s <= MAX_WAIT_S:
        raise BadRequest(f"wait must be between 0 and {MAX_WAIT_S:.0f} seconds.")
    return TaskOptions(outputs=names, overlay_alpha=alpha), wait_s


# -- submission -----------------------------------------------------------------------

def to_task(service: Service, record: TaskRecord, cached: bool = False) -> Task:
    return Task.from_record(record, queue_position=service.executor.queue_position(record.id),
                            cached=cached)


async def enqueue(service: Service, payload: bytes, options: TaskOptions) -> tuple[TaskRecord, bool]:
    """Admission control, de-duplication, then the queue. Returns (record, cached)."""
    model = service.require_ready()
    _, width, height = probe_image(payload, model.limits)
    network_size(width, height, model.config)  # refuses extreme aspect ratios now, not later
    key = content_key(payload, options, model.info.id)
    existing = service.store.find_by_key(key)
    if existing is not None:
        return existing, True
    record = TaskRecord(id=new_task_id(), options=options, key=key)
    service.store.create(record)
    try:
        service.executor.submit(record.id, payload, options)
    except (M2FPError, StoreUnavailable):
        service.store.delete(record.id)
        raise
    return record, False


async def wait_for(service: Service, task_id: str, wait_s: float) -> TaskRecord | None:
    end = time.monotonic() + wait_s
    while True:
        record = service.store.get(task_id)
        if record is None or record.status.terminal or time.monotonic() >= end:
            return record
        await asyncio.sleep(POLL_INTERVAL_S)


async def read_single_upload(request: Request, file: UploadFile) -> bytes:
    form = await request.form()
    if len(form.getlist("file")) != 1:
        raise BadRequest("Send exactly one `file` field; use /v1/batch for several photos.")
    return await file.read()


@v1.post("/parse", tags=["tasks"], operation_id="submitParse", status_code=202, response_model=Task,
         summary="Submit a photo for parsing",
         responses={200: {"model": Task, "description": "finished within `wait`, or cached"},
                    202: {"description": "accepted; poll the Location"},
                    **errors(400, 413, 415, 422, 503)})
async def submit_parse(
    request: Request,
    file: Annotated[UploadFile, File(description="JPEG, PNG or WebP photo", json_schema_extra=BINARY)],
    outputs: Annotated[str | None, Form(description="comma list of mask,overlay,labels,parts (default: all)")] = None,
    overlay_alpha: Annotated[float | None, Form(description="overlay opacity 0..1 (default 0.5)")] = None,
    wait: Annotated[float | None, Form(description="seconds (0..60) to wait for the result")] = None,
):
    service = service_of(request)
    options, wait_s = parse_options(outputs, overlay_alpha, wait)
    payload = await read_single_upload(request, file)
    try:
        record, cached = await enqueue(service, payload, options)
    except M2FPError as exc:
        service.metrics.rejected.labels(code=exc.code).inc()
        raise
    if wait_s > 0:
        record = await wait_for(service, record.id, wait_s) or record
    status = 200 if record.status.terminal else 202
    return JSONResponse(to_task(service, record, cached).model_dump(mode="json"), status_code=status,
                        headers={"Location": f"/v1/tasks/{record.id}"})


@v1.post("/batch", tags=["tasks"], operation_id="submitBatch", status_code=202, response_model=TaskList,
         summary="Submit several photos; a bad photo fails its own item only",
         responses=errors(400, 413, 503))
async def submit_batch(
    request: Request,
    files: Annotated[list[UploadFile], File(description="JPEG, PNG or WebP photos",
                                            json_schema_extra={"items": {"type": "string", **BINARY}})],
    outputs: Annotated[str | None, Form()] = None,
    overlay_alpha: Annotated[float | None, Form()] = None,
):
    service = service_of(request)
    options, _ = parse_options(outputs, overlay_alpha, None)
    service.require_ready()
    tasks = []
    for upload in files:
        payload = await upload.read()
        try:
            record, cached = await enqueue(service, payload, options)
        except M2FPError as exc:
            service.metrics.rejected.labels(code=exc.code).inc()
            record, cached = _failed_record(service, options, exc), False
        tasks.append(to_task(service, record, cached))
    return TaskList(tasks=tasks)


def _failed_record(service: Service, options: TaskOptions, exc: M2FPError) -> TaskRecord:
    """A refused batch item is still a task the client can read, failed from the start."""
    record = TaskRecord(id=new_task_id(), options=options, key=f"refused:{new_task_id()}")
    service.store.create(record)
    fail_task(service.store, record.id, exc.code, exc.message)
    return service.store.get(record.id) or record


# -- polling and results ---------------------------------------------------------------

def get_record(service: Service, task_id: str) -> TaskRecord:
    record = service.store.get(task_id)
    if record is None:
        raise NotFound("No such task (it may have expired).")
    return record


@v1.get("/tasks/{task_id}", tags=["tasks"], operation_id="getTask", response_model=Task, summary="Task status",
        responses=errors(404))
async def get_task(request: Request, task_id: str) -> Task:
    service = service_of(request)
    return to_task(service, get_record(service, task_id))


@v1.get("/tasks/{task_id}/events", tags=["tasks"], operation_id="streamTaskEvents", summary="Task changes as server-sent events",
        response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "one `task` event (a Task as JSON) per change, ending at a terminal status"},
                   **errors(404)})
async def task_events(request: Request, task_id: str):
    service = service_of(request)
    get_record(service, task_id)

    async def events():
        last = None
        while True:
            record = service.store.get(task_id)
            if record is None:
                yield {"event": "gone", "data": json.dumps({"id": task_id})}
                return
            task = to_task(service, record)
            snapshot = (record.version, task.queue_position)
            if snapshot != last:
                last = snapshot
                yield {"event": "task", "id": str(record.version), "data": task.model_dump_json()}
            if record.status.terminal:
                return
            await asyncio.sleep(EVENT_POLL_INTERVAL_S)

    return EventSourceResponse(events(), ping=15)


def _output(request: Request, task_id: str, name: str, media_type: str) -> Response:
    service = service_of(request)
    record = get_record(service, task_id)
    if record.status is not TaskStatus.succeeded:
        raise NotReady(f"The task is {record.status.value}; results exist once it has succeeded.")
    if name not in record.options.outputs:
        raise NotFound(f"`{name}` was not requested for this task.")
    data = service.store.get_output(task_id, name)
    if data is None:
        raise NotFound("No such task (it may have expired).")
    filename = OUTPUT_FILES[name]
    return Response(data, media_type=media_type,
                    headers={"Content-Disposition": f'inline; filename="{task_id}.{filename}"',
                             "Cache-Control": "private, max-age=3600"})


@v1.get("/tasks/{task_id}/mask.png", tags=["tasks"], operation_id="getMask", response_class=Response,
        summary="Colourised part map at the photo's size", responses={200: PNG, **errors(404, 409)})
async def get_mask(request: Request, task_id: str):
    return _output(request, task_id, "mask", "image/png")


@v1.get("/tasks/{task_id}/overlay.png", tags=["tasks"], operation_id="getOverlay", response_class=Response,
        summary="Part map blended over the photo", responses={200: PNG, **errors(404, 409)})
async def get_overlay(request: Request, task_id: str):
    return _output(request, task_id, "overlay", "image/png")


@v1.get("/tasks/{task_id}/labels.png", tags=["tasks"], operation_id="getLabels", response_class=Response,
        summary="One channel, pixel value = class id", responses={200: PNG, **errors(404, 409)})
async def get_labels_png(request: Request, task_id: str):
    return _output(request, task_id, "labels", "image/png")


@v1.get("/tasks/{task_id}/parts.json", tags=["tasks"], operation_id="getParts", response_class=Response,
        summary="The ParseResult as a file",
        responses={200: {"content": {"application/json": {}}}, **errors(404, 409)})
async def get_parts(request: Request, task_id: str):
    return _output(request, task_id, "parts", "application/json")


@v1.delete("/tasks/{task_id}", tags=["tasks"], operation_id="deleteTask", status_code=204, response_class=Response,
           summary="Cancel queued or running work and forget results", responses=errors(404))
async def delete_task(request: Request, task_id: str):
    service = service_of(request)
    record = get_record(service, task_id)
    if record.status.terminal:
        service.store.delete(task_id)
    else:
        # queued: cancelled now; running: stops at its next stage boundary
        service.executor.cancel(task_id)
    return Response(status_code=204)


# -- service --------------------------------------------------------------------------

@v1.get("/labels", tags=["service"], operation_id="listLabels", response_model=list[Label],
        summary="Classes of the loaded model with their colours", responses=errors(503))
async def list_labels(request: Request) -> list[Label]:
    names = service_of(request).require_ready().config.part_classes
    colours = render.palette(names)
    return [Label(id=i, name=n, color=colours[i].tolist()) for i, n in enumerate(names)]


@v1.get("/model", tags=["service"], operation_id="getModel", response_model=ModelInfoOut,
        summary="The loaded model and runtime", responses=errors(503))
async def get_model(request: Request) -> ModelInfoOut:
    import psutil

    service = service_of(request)
    info = service.require_ready().info
    return ModelInfoOut(id=info.id, revision=info.revision, classes=list(info.classes),
                        pretrained=info.pretrained, backend=info.backend, dtype=info.dtype,
                        threads=info.threads, single_human=info.single_human,
                        slots=service.executor.slots, rss_bytes=psutil.Process().memory_info().rss,
                        memory_budget_bytes=service.settings.memory_budget_mb * MB,
                        max_upload_bytes=int(service.settings.max_upload_mb * MB),
                        max_pixels=service.settings.max_pixels)


@ops.get("/healthz", tags=["service"], operation_id="health", response_model=Health, summary="Alive")
async def healthz() -> Health:
    return Health(status="ok")


@ops.get("/readyz", tags=["service"], operation_id="ready", response_model=Health,
         summary="Model loaded and work accepted", responses=errors(503))
async def readyz(request: Request) -> Health:
    service_of(request).require_ready()
    return Health(status="ready")


@ops.get("/metrics", tags=["service"], operation_id="metrics", response_class=Response, summary="Prometheus metrics",
         responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request):
    data = await run_in_threadpool(service_of(request).metrics.render)
    return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")
