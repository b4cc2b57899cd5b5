"""HTTP routes of shared/API.md: they parse requests and shape answers; what a request
may do is the service core's (tasks/service.py), taken through a dependency."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from .. import render
from ..errors import BadRequest
from ..outputs import OUTPUT_NAMES, OUTPUTS, Output
from ..result_json import MaskFormat
from ..tasks.memory_plan import MB
from ..tasks.service import TaskView
from ..tasks.task import Holding, TaskOptions
from ..webhooks.subscription import EVENTS, Subscription, parse_subscription
from .deps import OwnerDep, ServiceDep
from .schemas import ErrorBody, Health, Label, LoadedModel, ModelInfoOut, ModelList, OutputOut, Task, TaskList

MAX_WAIT_S = 60.0
# OpenAPI 3.1 marks uploads with contentMediaType only; generators (openapi-python-client
# among them) recognise a file by `format: binary`, so say both
BINARY = {"format": "binary"}

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


# a client's name for one request, so that a retry of it answers the first one's task(s)
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$",
    description="1 to 255 printable ASCII characters naming this request: sent again with the "
                "same photo(s) and options, the answer is the first request's task(s) (200) and "
                "nothing runs twice; with others, 422 `idempotency_key_reused`. Per API key and "
                "endpoint; kept as long as the task")]
REPLAYED = "Idempotent-Replayed"
REPLAYED_HEADER = {REPLAYED: {"description": "`true` when this answers an earlier request with the "
                                             "same Idempotency-Key", "schema": {"type": "string"}}}


def errors(*statuses: int) -> dict:
    return {s: {"model": ErrorBody} for s in statuses}


# API keys are checked by the Authenticate middleware (auth.py), before the body is read;
# `request.state.owner` names the caller's key
v1 = APIRouter(prefix="/v1", responses=errors(401))
ops = APIRouter()


# -- options --------------------------------------------------------------------------

MODEL_FIELD = "id of the model to run on, as `GET /v1/models` lists them (default: the first)"


def parse_options(outputs: str | None, overlay_alpha: float | None, masks: str | None,
                  wait: float | None, model: str | None) -> tuple[TaskOptions, float]:
    names = None  # the model's default outputs, filled in by the service core
    if outputs is not None:
        names = tuple(dict.fromkeys(o.strip() for o in outputs.split(",") if o.strip()))
        unknown = [n for n in names if n not in OUTPUT_NAMES]
        if unknown or not names:
            raise BadRequest(f"outputs must be a comma list of {','.join(OUTPUT_NAMES)}.")
    alpha = 0.5 if overlay_alpha is None else overlay_alpha
    if not 0.0 <= alpha <= 1.0:
        raise BadRequest("overlay_alpha must be between 0 and 1.")
    mask_format = MaskFormat.none
    if masks is not None:
        try:
            mask_format = MaskFormat(masks.strip())
        except ValueError:
            raise BadRequest(f"masks must be one of {','.join(f.value for f in MaskFormat)}.") from None
    wait_s = 0.0 if wait is None else wait
    if not 0.0 <= wait_s <= MAX_WAIT_S:
        raise BadRequest(f"wait must be between 0 and {MAX_WAIT_S:.0f} seconds.")
    # an unknown model is the core's to refuse (`unknown_model`): it knows what is loaded
    return TaskOptions(outputs=names, overlay_alpha=alpha, masks=mask_format, model=model or None), wait_s


OUTPUTS_FIELD = (f"comma list of {','.join(OUTPUT_NAMES)} (default: all the model writes; "
                 "persons needs a multi-person model)")
MASKS_FIELD = "rle: parts.json carries each part's and person's mask as COCO RLE (default: none)"


WEBHOOK_FIELD = ("https or http URL the task's JSON is POSTed to on `webhook_events`, signed "
                 "(Standard Webhooks); loopback, private and link-local addresses are refused")
WEBHOOK_EVENTS_FIELD = f"comma list of {','.join(EVENTS)} (default: completed)"


async def checked_webhook(service: ServiceDep, webhook: str | None, webhook_events: str | None) -> Subscription | None:
    subscription = parse_subscription(webhook, webhook_events)
    if subscription is not None:
        await run_in_threadpool(service.webhooks.check, subscription)  # it resolves the host
    return subscription


# -- submission -----------------------------------------------------------------------

def to_task(view: TaskView) -> Task:
    return Task.from_holding(view.held, queue_position=view.queue_position)


async def read_single_upload(request: Request, file: UploadFile) -> bytes:
    form = await request.form()
    if len(form.getlist("file")) != 1:
        raise BadRequest("Send exactly one `file` field; use /v1/batch for several photos.")
    return await file.read()


@v1.post("/parse", tags=["tasks"], operation_id="submitParse", status_code=202, response_model=Task,
         summary="Submit a photo for parsing",
         responses={200: {"model": Task, "description": "finished within `wait`, or the task of an "
                                                     "earlier request with this Idempotency-Key",
                          "headers": REPLAYED_HEADER},
                    202: {"description": "accepted; poll the Location"},
                    **errors(400, 409, 413, 415, 422), 503: RETRY_LATER})
async def submit_parse(
    request: Request,
    service: ServiceDep,
    owner: OwnerDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG or WebP photo", json_schema_extra=BINARY)],
    outputs: Annotated[str | None, Form(description=OUTPUTS_FIELD)] = None,
    overlay_alpha: Annotated[float | None, Form(description="overlay opacity 0..1 (default 0.5)")] = None,
    masks: Annotated[str | None, Form(description=MASKS_FIELD)] = None,
    wait: Annotated[float | None, Form(description="seconds (0..60) to wait for the result")] = None,
    model: Annotated[str | None, Form(description=MODEL_FIELD)] = None,
    webhook: Annotated[str | None, Form(description=WEBHOOK_FIELD)] = None,
    webhook_events: Annotated[str | None, Form(description=WEBHOOK_EVENTS_FIELD)] = None,
    idempotency_key: IdempotencyKey = None,
):
    options, wait_s = parse_options(outputs, overlay_alpha, masks, wait, model)
    subscription = await checked_webhook(service, webhook, webhook_events)
    payload = await read_single_upload(request, file)
    held = service.submit(payload, options, owner, idempotency_key, subscription)
    if wait_s > 0:
        held = await service.wait(held, wait_s)
    status = 200 if held.work.status.terminal or held.replayed else 202
    headers = {"Location": f"/v1/tasks/{held.handle.id}"}
    if held.replayed:
        headers[REPLAYED] = "true"
    return JSONResponse(to_task(service.view(held)).model_dump(mode="json"), status_code=status,
                        headers=headers)


@v1.post("/batch", tags=["tasks"], operation_id="submitBatch", status_code=202, response_model=TaskList,
         summary="Submit several photos; a bad photo fails its own item only",
         responses={200: {"model": TaskList, "description": "every item answered from an earlier batch "
                                                         "with this Idempotency-Key", "headers": REPLAYED_HEADER},
                    202: {"description": "accepted; items refused for lack of room say `queue_full` "
                                         "and `retry_after_s`, and so do these headers",
                          "headers": CAPACITY_REFUSED_HEADERS},
                    **errors(400, 413, 422), 503: RETRY_LATER})
async def submit_batch(
    service: ServiceDep,
    owner: OwnerDep,
    files: Annotated[list[UploadFile], File(description="JPEG, PNG or WebP photos",
                                            json_schema_extra={"items": {"type": "string", **BINARY}})],
    outputs: Annotated[str | None, Form(description=OUTPUTS_FIELD)] = None,
    overlay_alpha: Annotated[float | None, Form(description="overlay opacity 0..1 (default 0.5)")] = None,
    masks: Annotated[str | None, Form(description=MASKS_FIELD)] = None,
    model: Annotated[str | None, Form(description=MODEL_FIELD)] = None,
    webhook: Annotated[str | None, Form(description=WEBHOOK_FIELD + "; each item is delivered as its own task")] = None,
    webhook_events: Annotated[str | None, Form(description=WEBHOOK_EVENTS_FIELD)] = None,
    idempotency_key: IdempotencyKey = None,
):
    options, _ = parse_options(outputs, overlay_alpha, masks, None, model)
    subscription = await checked_webhook(service, webhook, webhook_events)

    async def payloads():  # read one at a time, as the core takes them
        for upload in files:
            yield await upload.read()

    batch = await service.submit_batch(payloads(), options, owner, idempotency_key, subscription)
    tasks = [to_task(service.view(i)) if isinstance(i, Holding) else Task.refused(i) for i in batch.items]
    headers = {}
    if batch.capacity_refused:
        headers = {"Retry-After": str(batch.retry_after_s), CAPACITY_REFUSED: str(len(batch.capacity_refused))}
    replayed = bool(batch.items) and all(isinstance(i, Holding) and i.replayed for i in batch.items)
    if replayed:
        headers[REPLAYED] = "true"
    return JSONResponse(TaskList(tasks=tasks).model_dump(mode="json"), status_code=200 if replayed else 202,
                        headers=headers)


# -- polling and results ---------------------------------------------------------------

@v1.get("/tasks/{task_id}", tags=["tasks"], operation_id="getTask", response_model=Task, summary="Task status",
        responses=errors(404))
async def get_task(service: ServiceDep, owner: OwnerDep, task_id: str) -> Task:
    return to_task(service.view(service.get(task_id, owner)))


@v1.get("/tasks/{task_id}/events", tags=["tasks"], operation_id="streamTaskEvents", summary="Task changes as server-sent events",
        response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "one `task` event (a Task as JSON) per change, ending at a terminal status"},
                   **errors(404)})
async def task_events(service: ServiceDep, owner: OwnerDep, task_id: str):
    service.get(task_id, owner)

    async def events():
        async for view in service.watch(task_id):
            if view is None:
                yield {"event": "gone", "data": json.dumps({"id": task_id})}
            else:
                yield {"event": "task", "id": str(view.held.work.version), "data": to_task(view).model_dump_json()}

    return EventSourceResponse(events(), ping=15)


def _file_response(output: Output) -> dict:
    """An image is declared binary (generators give it a file type); JSON as it is."""
    if output.media_type.startswith("image/"):
        return {"content": {output.media_type: {"schema": {"type": "string", "format": "binary"}}},
                "description": f"{output.media_type.removeprefix('image/').upper()} image"}
    return {"content": {output.media_type: {}}}


def _output_route(output: Output) -> None:
    """A typed route of its own for each output, so generated SDKs have a method for
    each (getMask, getOverlay, ...)."""

    async def get_output(service: ServiceDep, owner: OwnerDep, task_id: str):
        data = service.output(task_id, owner, output.name)
        return Response(data, media_type=output.media_type,
                        headers={"Content-Disposition": f'inline; filename="{task_id}.{output.file_name}"',
                                 "Cache-Control": "private, max-age=3600"})

    v1.add_api_route(f"/tasks/{{task_id}}/{output.file_name}", get_output, methods=["GET"], tags=["tasks"],
                     operation_id=f"get{output.name.title()}", name=f"get_{output.name}",
                     response_class=Response, summary=output.title,
                     responses={200: _file_response(output), **errors(404, 409)})


for _each in OUTPUTS:
    _output_route(_each)


@v1.delete("/tasks/{task_id}", tags=["tasks"], operation_id="deleteTask", status_code=204, response_class=Response,
           summary="Forget this task; work no other submission shares is cancelled", responses=errors(404))
async def delete_task(service: ServiceDep, owner: OwnerDep, task_id: str):
    service.cancel(task_id, owner)
    return Response(status_code=204)


# -- service --------------------------------------------------------------------------

@v1.get("/labels", tags=["service"], operation_id="listLabels", response_model=list[Label],
        summary="Classes of a loaded model with their colours", responses=errors(400, 503))
async def list_labels(service: ServiceDep, model: Annotated[str | None, Query(description=MODEL_FIELD)] = None,
                      ) -> list[Label]:
    names = service.require_ready(model).config.part_classes
    return [Label(id=i, name=n, color=render.PALETTE[i].tolist()) for i, n in enumerate(names)]


@v1.get("/models", tags=["service"], operation_id="listModels", response_model=ModelList,
        summary="The models this service runs; a request picks one with its `model` field",
        responses=errors(503))
async def list_models(service: ServiceDep) -> ModelList:
    cards = service.models()
    return ModelList(default=cards[0].info.id, models=[LoadedModel.of(card.info) for card in cards])


@v1.get("/model", tags=["service"], operation_id="getModel", response_model=ModelInfoOut,
        summary="The default model and the runtime", responses=errors(503))
async def get_model(service: ServiceDep) -> ModelInfoOut:
    import psutil

    info = service.require_ready().info
    return ModelInfoOut(**ModelInfoOut.fields_of(info), slots=service.slots,
                        rss_bytes=psutil.Process().memory_info().rss,
                        memory_budget_bytes=service.settings.memory_budget_mb * MB,
                        max_upload_bytes=int(service.settings.max_upload_mb * MB),
                        max_pixels=service.settings.max_pixels,
                        outputs=[OutputOut.of(output) for output in OUTPUTS if output.available(info)])


@ops.get("/healthz", tags=["service"], operation_id="health", response_model=Health, summary="Alive")
async def healthz() -> Health:
    return Health(status="ok")


@ops.get("/readyz", tags=["service"], operation_id="ready", response_model=Health,
         summary="Model loaded and work accepted", responses=errors(503))
async def readyz(service: ServiceDep) -> Health:
    service.require_ready()
    return Health(status="ready")


@ops.get("/metrics", tags=["service"], operation_id="metrics", response_class=Response, summary="Prometheus metrics",
         responses={200: {"content": {"text/plain": {}}}})
async def metrics(service: ServiceDep):
    data = await run_in_threadpool(service.metrics.render)
    return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")
