"""Limits on what a request may hold while its head and body arrive.

- The request line and headers are at most `max_header_bytes` (431).
- The body is at most `max_body_bytes` (413): a declared Content-Length over it is
  refused before a byte is read, a chunked body the moment it passes it.
- All requests in progress hold at most `UploadBudget.limit` body bytes at once (503
  `uploads_busy`): a declared length is reserved from the head, before the body is
  read; a chunked body reserves as it arrives. Without this, a thousand clients that
  each send a megabyte and stall hold a gigabyte (the form parser keeps the first
  megabyte of each file in memory).
- A body must keep arriving: no pause longer than `body_timeout_s`, and, once that
  grace is over, an average pace of at least `min_rate` bytes a second (408, and the
  connection is closed). The head has its own deadline in the protocol (protocol.py).

Refusals are answered here, with `Connection: close`, so that an unread body is
dropped with the connection rather than read to find the next request.
"""

from __future__ import annotations

import asyncio
import json
import random

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.memory import release_free_memory

# Refused clients are told to come back after a spread of delays, not all at once.
RETRY_AFTER_S = (2, 8)
# After this many body bytes were held and released, give the freed heap back to the OS
# (glibc keeps it otherwise, and the RSS would stay at the stall's peak).
TRIM_AFTER_BYTES = 32 * 2**20


def retry_after() -> str:
    return str(random.randint(*RETRY_AFTER_S))


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: dict[str, str] | None = None, close: bool = False) -> None:
    body = error_body(code, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def too_large(limit: int) -> str:
    return f"The request body is over the limit of {limit} bytes."


BUSY = "The server is receiving as many uploads as it can hold; retry shortly."


def has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers


class UploadBudget:
    """Body bytes held by requests in progress. Used from the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.released_since_trim = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> bool:
        """Returns n bytes; True when it is time to give freed heap back to the OS."""
        self.held -= n
        self.released_since_trim += n
        if self.held == 0 and self.released_since_trim >= TRIM_AFTER_BYTES:
            self.released_since_trim = 0
            return True
        return False


class RequestRefused(HTTPException):
    """Raised from `receive` to unwind the application once the refusal has been sent.
    An HTTPException, so that the framework's body parsing passes it through (it turns
    any other exception raised while reading a form into a 400)."""


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_header_bytes: int, max_body_bytes: int,
                 budget: UploadBudget, body_timeout_s: float, min_rate: float) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        self.body_timeout_s = body_timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = (len(scope["raw_path"]) + len(scope["query_string"])
                + sum(len(k) + len(v) + 4 for k, v in scope["headers"]))
        if head > self.max_header_bytes:
            await send_error(send, 431, "headers_too_large", (
                f"The request line and headers are over the limit of {self.max_header_bytes} bytes."),
                close=True)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await send_error(send, 413, "payload_too_large", too_large(self.max_body_bytes), close=True)
            return
        reserved = int(declared or 0)
        if not self.budget.take(reserved):
            await send_error(send, 503, "uploads_busy", BUSY, {"retry-after": retry_after()}, close=True)
            return
        await _BodyStream(self, scope, receive, send, reserved).run()


class _BodyStream:
    """One request's body as it arrives: counted, reserved, and held to its deadlines."""

    def __init__(self, limits: RequestLimits, scope: Scope, receive: Receive, send: Send,
                 reserved: int) -> None:
        self.limits, self.scope, self._receive, self._send = limits, scope, receive, send
        self.reserved = reserved
        self.received = 0
        self.complete = not has_body(scope)
        self.started = asyncio.get_running_loop().time()
        self.last_data = self.started
        self.response_started = False
        self.refused = False

    async def run(self) -> None:
        try:
            await self.limits.app(self.scope, self.receive, self.send)
        except RequestRefused:  # raised outside the framework's handlers
            pass
        finally:
            if self.limits.budget.give(self.reserved):
                await run_in_threadpool(release_free_memory)

    def deadline(self) -> float:
        limits = self.limits
        paced = self.started + limits.body_timeout_s + self.received / limits.min_rate
        return min(self.last_data + limits.body_timeout_s, paced)

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        # A message already buffered is returned without waiting, so the deadline only
        # fires when the server is waiting on the client, not when it was slow to read.
        try:
            async with asyncio.timeout_at(self.deadline()):
                message = await self._receive()
        except TimeoutError:
            await self.refuse(408, "request_timeout",
                              "The request body arrived too slowly or stopped; the connection is closed.")
        if message["type"] != "http.request":
            return message
        chunk = len(message.get("body", b""))
        self.received += chunk
        self.complete = not message.get("more_body", False)
        if chunk:
            self.last_data = asyncio.get_running_loop().time()
        if self.received > self.limits.max_body_bytes:
            await self.refuse(413, "payload_too_large", too_large(self.limits.max_body_bytes))
        if self.received > self.reserved:  # a chunked body reserves as it arrives
            if not self.limits.budget.take(self.received - self.reserved):
                await self.refuse(503, "uploads_busy", BUSY, {"retry-after": retry_after()})
            self.reserved = self.received
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # the refusal was the answer; the framework's own is dropped
        if message["type"] == "http.response.start":
            self.response_started = True
            if not self.complete:  # answered before the body was read: drop it with the connection
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self._send(message)

    async def refuse(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        if not self.response_started:
            await send_error(self._send, status, code, message, headers, close=True)
            self.refused = True
        raise RequestRefused(status, message)
