"""Every error leaves as `{"error": {"code", "message"}}`: never a traceback, a path or
a library name."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import M2FPError
from ..tasks.store import StoreUnavailable

log = logging.getLogger("m2fp.api")

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              409: "not_ready", 413: "payload_too_large", 415: "unsupported_media_type",
              422: "invalid_request", 429: "too_many_requests", 503: "not_ready"}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "The request is malformed."


def install(app: FastAPI) -> None:
    @app.exception_handler(M2FPError)
    async def _typed(request: Request, exc: M2FPError):
        headers = {"Retry-After": str(exc.retry_after_s)} if hasattr(exc, "retry_after_s") else None
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(StoreUnavailable)
    async def _store(request: Request, exc: StoreUnavailable):
        return error_response(503, "store_unavailable", "The task store is unreachable; retry shortly.",
                              {"Retry-After": "2"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(400, "bad_request", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 400:
            # the framework's own words for an unreadable body are terse; say what to fix
            message = (f"The body is not valid multipart/form-data ({message.rstrip('.')}); "
                       "part header lines are limited to 4 KB.")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "The server failed to handle the request.")
