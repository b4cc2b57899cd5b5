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
from ..errors import BadRequest
from ..tasks.task import OUTPUT_FILES, OUTPUT_NAMES, Holding, TaskOptions
from .schemas import ErrorBody, Health, Label, ModelInfoOut, OutputOut, Task, TaskList
from ..tasks.service import MB, BatchOutcome, Service

MAX_WAIT_S = 60.0
POLL_INTERVAL_S = 0.05
EVENT_POLL_INTERVAL_S = 0.1
# OpenAPI 3.1 marks uploads with contentMediaType only; generators (openapi-python-client
# among them) recognise a file by `format: binary`, so say both
BINARY = {"format": "binary"}
PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
       "description": "PNG image"}

# a batch answered 202 although some items found no room: how many, and when to resubmit them
CAPACITY_REFUSED = "Capacity-Refused"
RETRY_AFTER_HEADER = {"description": "seconds to wait before trying again, spread per client",
                      "schema": {"type": "integer", "minimum": 1}}
CAPACITY_REFUSED_HEADERS = {
    "Retry-After": {**RETRY_AFTER_HEADER, "description": "seconds after which the items refused "
                                                         "for capacity may be resubmitted (only then)"},
    CAPACITY_REFUSED: {"description": "how many items were refused for capacity (`queue_full`; "
                                      "only when some were)", "schema": {"type": "integer", "minimum": 1}},
}
RETRY_LATER = {"model": ErrorBody, "headers": {"Retry-After": RETRY_AFTER_HEADER},
               "description": "`queue_full` (no room: retry after `Retry-After`), `not_ready`, "
                              "`model_unavailable`, `store_unavailable`"}


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

def owner_of(request: Request) -> str | None:
    """The caller's key, as the Authenticate middleware recorded it (None without keys)."""
    return getattr(request.state, "owner", None)


def to_task(service: Service, held: Holding) -> Task:
    return Task.from_holding(held, queue_position=service.executor.queue_position(held.work.id))


async def wait_for(service: Service, held: Holding, wait_s: float) -> Holding:
    end = time.monotonic() + wait_s
    while not held.work.status.terminal and time.monotonic() < end:
        await asyncio.sleep(POLL_INTERVAL_S)
        held = service.store.lookup(held.handle.id) or held
    return held


async def read_single_upload(request: Request, file: UploadFile) -> bytes:
    form = await request.form()
    if len(form.getlist("file")) != 1:
        raise BadRequest("Send exactly one `file` field; use /v1/batch for several photos.")
    return await file.read()


@v1.post("/parse", tags=["tasks"], operation_id="submitParse", status_code=202, response_model=Task,
         summary="Submit a photo for parsing",
         responses={200: {"model": Task, "description": "finished within `wait`, or cached"},
                    202: {"description": "accepted; poll the Location"},
                    **errors(400, 413, 415, 422), 503: RETRY_LATER})
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
    held = service.submit(payload, options, owner_of(request))
    if wait_s > 0:
        held = await wait_for(service, held, wait_s)
    status = 200 if held.work.status.terminal else 202
    return JSONResponse(to_task(service, held).model_dump(mode="json"), status_code=status,
                        headers={"Location": f"/v1/tasks/{held.handle.id}"})


@v1.post("/batch", tags=["tasks"], operation_id="submitBatch", status_code=202, response_model=TaskList,
         summary="Submit several photos; a bad photo fails its own item only",
         responses={202: {"description": "accepted; items refused for lack of room say `queue_full` "
                                         "and `retry_after_s`, and so do these headers",
                          "headers": CAPACITY_REFUSED_HEADERS},
                    **errors(400, 413), 503: RETRY_LATER})
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
    owner = owner_of(request)
    batch = BatchOutcome()
    for upload in files:
        batch.items.append(service.submit_item(await upload.read(), options, owner))
    batch.raise_if_nothing_fits()
    tasks = [to_task(service, i) if isinstance(i, Holding) else Task.refused(i) for i in batch.items]
    headers = {}
    if batch.capacity_refused:
        headers = {"Retry-After": str(batch.retry_after_s), CAPACITY_REFUSED: str(len(batch.capacity_refused))}
    return JSONResponse(TaskList(tasks=tasks).model_dump(mode="json"), status_code=202, headers=headers)


# -- polling and results ---------------------------------------------------------------

@v1.get("/tasks/{task_id}", tags=["tasks"], operation_id="getTask", response_model=Task, summary="Task status",
        responses=errors(404))
async def get_task(request: Request, task_id: str) -> Task:
    service = service_of(request)
    return to_task(service, service.task(task_id, owner_of(request)))


@v1.get("/tasks/{task_id}/events", tags=["tasks"], operation_id="streamTaskEvents", summary="Task changes as server-sent events",
        response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "one `task` event (a Task as JSON) per change, ending at a terminal status"},
                   **errors(404)})
async def task_events(request: Request, task_id: str):
    service = service_of(request)
    service.task(task_id, owner_of(request))

    async def events():
        last = None
        while True:
            held = service.store.lookup(task_id)
            if held is None:
                yield {"event": "gone", "data": json.dumps({"id": task_id})}
                return
            task = to_task(service, held)
            snapshot = (held.work.version, task.queue_position)
            if snapshot != last:
                last = snapshot
                yield {"event": "task", "id": str(held.work.version), "data": task.model_dump_json()}
            if held.work.status.terminal:
                return
            await asyncio.sleep(EVENT_POLL_INTERVAL_S)

    return EventSourceResponse(events(), ping=15)


def _output(request: Request, task_id: str, name: str, media_type: str) -> Response:
    data = service_of(request).output(task_id, owner_of(request), name)
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
           summary="Forget this task; work no other submission shares is cancelled", responses=errors(404))
async def delete_task(request: Request, task_id: str):
    service_of(request).delete_task(task_id, owner_of(request))
    return Response(status_code=204)


# -- service --------------------------------------------------------------------------

@v1.get("/labels", tags=["service"], operation_id="listLabels", response_model=list[Label],
        summary="Classes of the loaded model with their colours", responses=errors(503))
async def list_labels(request: Request) -> list[Label]:
    names = service_of(request).require_ready().config.part_classes
    colours = render.palette(names)
    return [Label(id=i, name=n, color=colours[i].tolist()) for i, n in enumerate(names)]


# /v1/model describes each output as its route declares it (file, media type, summary), so
# clients such as the page need no list of their own
_ROUTE_BY_FILE = {route.path.rsplit("/", 1)[1]: route for route in v1.routes}
OUTPUTS = [OutputOut(name=name, file_name=file_name, title=_ROUTE_BY_FILE[file_name].summary,
                     media_type=next(iter(_ROUTE_BY_FILE[file_name].responses[200]["content"])))
           for name, file_name in OUTPUT_FILES.items()]


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
                        max_pixels=service.settings.max_pixels, outputs=OUTPUTS)


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
