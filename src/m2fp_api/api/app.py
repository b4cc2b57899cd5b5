"""The FastAPI application and `m2fp serve` (uvicorn with a draining SIGTERM)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..settings import Settings
from . import errors
from .auth import ApiKeys, Authenticate, OpenPaths, declare_security
from .limits import RequestLimits, UploadBudget
from .protocol import guarded_protocol
from .routes import CAPACITY_REFUSED, ops, v1
from .schemas import Task
from ..tasks.service import EVENT_POLL_INTERVAL_S, Service

log = logging.getLogger("m2fp.api")
STREAM_FLUSH_S = 5 * EVENT_POLL_INTERVAL_S
WEB = resources.files("m2fp_api").joinpath("web")


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    settings = settings or Settings()
    service = service or Service.from_settings(settings)
    # webhooks deliver a task as GET /v1/tasks/{id} answers it
    service.webhooks.describe = lambda held: Task.from_holding(held).model_dump_json()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        if not service.draining:
            service.drain()

    app = FastAPI(title="m2fp-api", version=__version__, lifespan=lifespan,
                  description="Multi-person human parsing (M2FP). Submit a photo, poll the task, "
                              "fetch the colourised mask, overlay, class-id labels and per-part JSON.")
    app.state.service = service
    errors.install(app)
    app.include_router(v1)
    app.include_router(ops)
    app.mount("/static", StaticFiles(directory=str(WEB)), name="static")

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def index():
        return HTMLResponse(WEB.joinpath("index.html").read_text())

    keys, open_paths = ApiKeys.parse(settings.api_key), OpenPaths.parse(settings.open_paths)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = declare_security(_exact_errors(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes)),
                open_paths, required=bool(keys))
        return app.openapi_schema

    app.openapi = openapi

    # the last added runs first: CORS (preflights carry no key), keys, then body limits
    app.add_middleware(RequestLimits, max_header_bytes=settings.max_header_kb * 1024,
                       max_body_bytes=int(settings.max_upload_mb * 2**20),
                       budget=UploadBudget(int(settings.max_uploads_mb * 2**20)),
                       body_timeout_s=settings.body_timeout_s, min_rate=settings.min_upload_kb_s * 1024)
    app.add_middleware(Authenticate, keys=keys, open_paths=open_paths)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                           expose_headers=["Location", "Retry-After", CAPACITY_REFUSED])
    return app


def _exact_errors(spec: dict) -> dict:
    """FastAPI documents a `422 HTTPValidationError` on every route with parameters, but
    this service answers request validation errors with `400 ErrorBody`: say so."""
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for methods in spec["paths"].values():
        for op in methods.values():
            responses = op["responses"]
            default = responses.get("422", {}).get("content", {}).get("application/json", {})
            if default.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
                responses.setdefault("400", {"description": "Bad Request",
                                             "content": {"application/json": {"schema": error_ref}}})
    for name in ("HTTPValidationError", "ValidationError"):
        spec.get("components", {}).get("schemas", {}).pop(name, None)
    return spec


class JsonFormatter(logging.Formatter):
    """One JSON object a line; carries `task_id` when the log call gives one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if getattr(record, "task_id", None):
            doc["task_id"] = record.task_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: stop being ready, refuse new work with 503, let queued
    and running tasks finish (up to the drain deadline), then exit. A second signal
    exits at once."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("received %s: draining before exit", signal.Signals(sig).name)

        def drain_then_exit() -> None:
            self.service.drain()
            # open event streams close when the server exits: give them a few polls to
            # deliver the terminal statuses the drain just produced
            time.sleep(STREAM_FLUSH_S)
            self.should_exit = True

        threading.Thread(target=drain_then_exit, name="m2fp-drain", daemon=True).start()


def serve(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings)
    service = Service.from_settings(settings)
    app = create_app(settings, service)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=5, timeout_keep_alive=settings.keep_alive_s,
                            http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
                            ws="none",  # no WebSocket routes: upgrade requests stay plain HTTP
                            h11_max_incomplete_event_size=settings.max_header_kb * 1024)
    DrainingServer(config, service).run()
    if service.still_running():
        # Past the drain deadline a slot can still be inside a torch kernel that cannot be
        # interrupted; its task is already recorded as failed (`shutdown`). Finalising the
        # interpreter under a running native thread (or a background compile) aborts the
        # process, so leave now.
        log.info("exiting with abandoned work (a task or a compile) still unwinding")
        logging.shutdown()
        os._exit(0)
