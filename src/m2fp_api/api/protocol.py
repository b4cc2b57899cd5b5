"""uvicorn's h11 HTTP/1.1 protocol with the limits it leaves to the application.

uvicorn answers malformed requests itself, in plain text, and arms no timer until a
first response is sent: a client that opens a connection and sends its head slowly, or
not at all, holds it for ever. Here:

- malformed request lines and headers get a JSON 400, a head over the size limit a JSON
  431 (h11 reports it while the head is still incomplete; the application checks
  complete heads, see limits.py);
- the head must arrive within `header_timeout_s` of the connection opening (or of the
  previous response): data arriving does not extend it, so trickling does not help. A
  client that sent part of a head gets a JSON 408; one that sent nothing is closed;
- past `max_connections` open connections, the one that has kept the server waiting
  longest (at least `IDLE_DROP_S`: an idle keep-alive, a stalled head or body) is closed
  to make room, as nginx does with idle keep-alive connections; when none has, the new
  connection is answered 503 `too_many_connections` as soon as its head arrives, and
  closed;
- a connection reads at most `READ_BYTES` at a time (asyncio's default is 256 KB):
  with uvicorn pausing reading once 64 KB wait for the application, a streaming body
  holds at most ~128 KB of buffers besides what the application has received.

Everything else, including keep-alive and the body, is uvicorn's.
"""

from __future__ import annotations

import asyncio
import http

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import BadRequest, CodedError, HeadersTooLarge, RequestTimeout, TooManyConnections
from .limits import IDLE_DROP_S, error_body, send_error, spread_retry_after_s

READ_BYTES = 64 * 1024


def raw_error(error: CodedError) -> bytes:
    """A complete JSON error response, for answers given before h11 has a request."""
    body = error_body(error)
    status = error.status
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


async def too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    await send_error(send, TooManyConnections(
        "The server has as many open connections as it serves; retry shortly.", spread_retry_after_s()),
        close=True)


class _Connection(h11.Connection):
    """Remembers the status h11 suggests for the last malformed request (400 or 431)."""

    error_status_hint = 400

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status_hint = exc.error_status_hint
            raise


class GuardedH11Protocol(H11Protocol, asyncio.BufferedProtocol):
    header_timeout_s: float  # set by guarded_protocol()
    max_connections: int

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.read_buffer = memoryview(bytearray(READ_BYTES))
        self.conn = _Connection(h11.SERVER, config.h11_max_incomplete_event_size
                                or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        self.header_timer: asyncio.TimerHandle | None = None
        self.head_started = False
        self.last_activity = self.loop.time()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_now = sum(1 for c in self.connections if not c.transport.is_closing())
        if open_now > self.max_connections and not self._drop_the_idlest():
            self.app = too_many_connections
        self._arm_header_timer(head_started=False)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.conn.their_state is h11.IDLE:
            self.head_started = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        self.last_activity = self.loop.time()
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            # the next head (perhaps partly pipelined already) has the same deadline
            self._arm_header_timer(head_started=bool(self.conn.trailing_data[0]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # malformed data while an answer is under way: only closing is left
            return
        if self.conn.error_status_hint == 431:
            response = raw_error(HeadersTooLarge("The request line and headers are too large."))
        else:
            response = raw_error(BadRequest("The request line or headers are not valid HTTP/1.1."))
        self.transport.write(response)
        self.transport.close()

    def idle_for(self, now: float) -> float:
        """How long this connection has kept the server waiting on its client: 0 while the
        server is the busy side (answering, or not reading because the app is behind)."""
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        waiting = (self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not answering
                   and not self.flow.read_paused and not self.transport.is_closing())
        return now - self.last_activity if waiting else 0.0

    def _drop_the_idlest(self) -> bool:
        now = self.loop.time()
        idlest = max((c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self),
                     key=lambda c: c.idle_for(now), default=None)
        if idlest is None or idlest.idle_for(now) < IDLE_DROP_S:
            return False
        idlest._close("The request stopped arriving while others needed the connection; it is closed.")
        return True

    def _close(self, reason: str) -> None:
        """Closes the connection; a client part-way through a request is told why (408)."""
        if self.head_started or self.conn.their_state is h11.SEND_BODY:
            self.transport.write(raw_error(RequestTimeout(reason)))
        self.transport.close()

    def _arm_header_timer(self, head_started: bool) -> None:
        self._cancel_header_timer()
        self.head_started = head_started
        self.header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self._close("The request head arrived too slowly; the connection is closed.")


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
