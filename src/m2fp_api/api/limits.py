"""Limits on what a request may hold while its head and body arrive.

- The request line and headers are at most `max_header_bytes` (431).
- The body is at most `max_body_bytes` (413): a declared Content-Length over it is
  refused before a byte is read, a chunked body the moment it passes it.
- Bodies being received hold at most `UploadBudget.limit` bytes at once (503
  `uploads_busy`): each holds what has arrived of it plus what the server may have read
  ahead of the application (`READ_AHEAD_BYTES`, taken from the head, before the body is
  read); all is returned once the body is in. Without this, a thousand clients that
  each send a megabyte and stall hold a gigabyte (the form parser keeps the first
  megabyte of each file in memory). Counting what arrived, not what a head declares,
  makes a client pay in bandwidth for the room it holds: a head that promises 19 MB
  holds no more than one that promises 1 MB.
- A body must keep arriving: no pause longer than `body_timeout_s`, and, once that
  grace is over, an average pace of at least `min_rate` bytes a second (408, and the
  connection is closed). The head has its own deadline in the protocol (protocol.py).
- When the budget is short, a body that has kept the server waiting for
  `IDLE_DROP_S` gives its room up (408) to the request that needs it: stalled clients
  cannot keep active ones out. The protocol does the same with connections.

Refusals are answered here, with `Connection: close`, so that an unread body is
dropped with the connection rather than read to find the next request.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import NoReturn

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.memory import release_free_memory
from ..errors import CodedError, HeadersTooLarge, PayloadTooLarge, RequestTimeout, UploadsBusy

# A client that has kept the server waiting this long is dropped when others need its
# room (upload budget, connections); an honest upload does not pause this long.
IDLE_DROP_S = 2.0
# Refused clients are told to come back after a spread of delays, not all at once.
RETRY_AFTER_S = (2, 8)
# Once this many body bytes were held and returned, give the freed heap back to the OS
# (glibc keeps it otherwise, and the RSS would stay at the stall's peak).
TRIM_AFTER_BYTES = 32 * 2**20
# What the server may hold of a body beyond what the application has received: the
# protocol reads 64 KB at a time, uvicorn pauses reading once 64 KB wait for the
# application, and each piece is copied a few times on its way to the spooled file.
READ_AHEAD_BYTES = 512 * 1024


def spread_retry_after_s() -> int:
    return random.randint(*RETRY_AFTER_S)


def error_body(error: CodedError) -> bytes:
    return json.dumps({"error": {"code": error.code, "message": error.message}}).encode()


async def send_error(send: Send, error: CodedError, headers: dict[str, str] | None = None,
                     close: bool = False) -> None:
    body = error_body(error)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.retry_after_s is not None:
        raw.append((b"retry-after", str(error.retry_after_s).encode()))
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is over the limit of {limit} bytes.")


def uploads_busy() -> UploadsBusy:
    return UploadsBusy("The server is receiving as many uploads as it can hold; retry shortly.",
                       spread_retry_after_s())


def has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers


class UploadBudget:
    """Body bytes held by requests whose body is still arriving. Event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.returned_since_trim = 0
        self.waiting: set[_BodyStream] = set()  # bodies the server is waiting on

    def take(self, stream: "_BodyStream", n: int) -> bool:
        if self.held + n > self.limit:
            self._drop_idle(self.held + n - self.limit)
        if self.held + n > self.limit:
            return False
        self.held += n
        stream.held += n
        return True

    def give_back(self, stream: "_BodyStream") -> None:
        self.held -= stream.held
        self.returned_since_trim += stream.held
        stream.held = 0

    def trim_due(self) -> bool:
        if self.held or self.returned_since_trim < TRIM_AFTER_BYTES:
            return False
        self.returned_since_trim = 0
        return True

    def _drop_idle(self, needed: int) -> None:
        now = asyncio.get_running_loop().time()
        idle = sorted((s for s in self.waiting if s.held and now - s.waiting_since >= IDLE_DROP_S),
                      key=lambda s: s.waiting_since)
        for stream in idle:
            if needed <= 0:
                return
            needed -= stream.held
            stream.drop()


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
        head = (len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
                + sum(len(k) + len(v) + 4 for k, v in scope["headers"]))
        if head > self.max_header_bytes:
            await send_error(send, HeadersTooLarge(
                f"The request line and headers are over the limit of {self.max_header_bytes} bytes."),
                close=True)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await send_error(send, too_large(self.max_body_bytes), close=True)
            return
        stream = _BodyStream(self, scope, receive, send, int(declared) if declared else None)
        if not self.budget.take(stream, stream.room_wanted()):
            await send_error(send, uploads_busy(), close=True)
            return
        await stream.run()


class _BodyStream:
    """One request's body as it arrives: counted, held in the budget, and held to its
    deadlines."""

    def __init__(self, limits: RequestLimits, scope: Scope, receive: Receive, send: Send,
                 declared: int | None) -> None:
        self.limits, self.budget = limits, limits.budget
        self.scope, self._receive, self._send = scope, receive, send
        self.declared = declared
        self.held = 0
        self.received = 0
        self.complete = not has_body(scope)
        self.started = asyncio.get_running_loop().time()
        self.last_data = self.started
        self.waiting_since = 0.0
        self.wait: asyncio.Timeout | None = None
        self.dropped = False
        self.response_started = False
        self.refused = False

    async def run(self) -> None:
        try:
            await self.limits.app(self.scope, self.receive, self.send)
        except RequestRefused:  # raised outside the framework's handlers
            pass
        finally:
            self.budget.give_back(self)
            if self.budget.trim_due():
                await run_in_threadpool(release_free_memory)

    def room_wanted(self) -> int:
        if self.complete:
            return 0
        ahead = self.received + READ_AHEAD_BYTES
        return ahead if self.declared is None else min(ahead, self.declared)

    def deadline(self) -> float:
        limits = self.limits
        paced = self.started + limits.body_timeout_s + self.received / limits.min_rate
        return min(self.last_data + limits.body_timeout_s, paced)

    def drop(self) -> None:
        """Gives this body's room up at once; its wait ends now, with a 408."""
        self.dropped = True
        self.budget.give_back(self)
        if self.wait is not None:
            self.wait.reschedule(asyncio.get_running_loop().time())

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        # A message already buffered is returned without suspending, so the deadline
        # only fires when the server is waiting on the client, not when it was slow to read.
        self.waiting_since = asyncio.get_running_loop().time()
        self.budget.waiting.add(self)
        try:
            async with asyncio.timeout_at(self.deadline()) as self.wait:
                message = await self._receive()
        except TimeoutError:
            await self.refuse(RequestTimeout(
                "The request body stopped while others needed its room; the connection is closed."
                if self.dropped else
                "The request body arrived too slowly or stopped; the connection is closed."))
        finally:
            self.wait = None
            self.budget.waiting.discard(self)
        if message["type"] != "http.request":
            return message
        chunk = len(message.get("body", b""))
        self.received += chunk
        self.complete = not message.get("more_body", False)
        if chunk:
            self.last_data = asyncio.get_running_loop().time()
        if self.received > self.limits.max_body_bytes:
            await self.refuse(too_large(self.limits.max_body_bytes))
        if self.complete:
            self.budget.give_back(self)  # the body is in: its bytes are the route's now
        elif self.room_wanted() > self.held and not self.budget.take(self, self.room_wanted() - self.held):
            await self.refuse(uploads_busy())
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # the refusal was the answer; the framework's own is dropped
        if message["type"] == "http.response.start":
            self.response_started = True
            if not self.complete:  # answered before the body was read: drop it with the connection
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self._send(message)

    async def refuse(self, error: CodedError) -> NoReturn:
        if not self.response_started:
            await send_error(self._send, error, close=True)
            self.refused = True
        raise RequestRefused(error.status, error.message)
