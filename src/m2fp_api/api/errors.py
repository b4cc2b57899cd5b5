"""Every error leaves as `{"error": {"code", "message"}}`: never a traceback, a path or
a library name."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadRequest, CodedError, framework_code

log = logging.getLogger("m2fp.api")


def json_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def error_response(error: CodedError) -> JSONResponse:
    headers = None if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
    return json_error(error.status, error.code, error.message, headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "The request is malformed."


def install(app: FastAPI) -> None:
    @app.exception_handler(CodedError)
    async def _typed(request: Request, exc: CodedError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(BadRequest(_describe_validation(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 400:
            # the framework's own words for an unreadable body are terse; say what to fix
            message = (f"The body is not valid multipart/form-data ({message.rstrip('.')}); "
                       "part header lines are limited to 4 KB.")
        return json_error(exc.status_code, framework_code(exc.status_code), message,
                          getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(CodedError("The server failed to handle the request."))
