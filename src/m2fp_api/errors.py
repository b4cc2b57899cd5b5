"""Every error the library and the service answer with, each with a stable
machine-readable `code` and the HTTP status it maps to (api/usage.md documents them).

Messages are written for the caller: they never carry a path, a traceback or a library
name. The HTTP layer answers any of these as `{"error": {"code", "message"}}`, with
`Retry-After` when `retry_after_s` is set.

Two families:
- `M2FPError`: this photo, request or task cannot be served as asked (bad input, no
  room, no model). Raised by the engine and the service; a batch fails the one item, a
  task fails with the code.
- `TaskFailure`: how a task ends failed when its photo did not fail it (time limits,
  shut-down, memory, a lost worker, a bug); recorded as the task's error only.
- the others: the infrastructure's and the transport's. They answer the whole request
  and are never a task's or a batch item's outcome: the task store away, and what the
  HTTP layer answers on its own around the routes (keys, heads, bodies, connections).
"""

from __future__ import annotations


class CodedError(Exception):
    code = "internal_error"
    status = 500
    # when the caller may try again, in seconds (sent as Retry-After); None: not said
    retry_after_s: int | None = None

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


# --- this request, photo or task ----------------------------------------------------------

class M2FPError(CodedError):
    """The photo, the request or the service's state refuses this piece of work."""


class BadRequest(M2FPError):
    code, status = "bad_request", 400


class UnknownModel(M2FPError):
    """A request named a model this service has not loaded (`GET /v1/models` lists them)."""

    code, status = "unknown_model", 400


class WebhookRefused(M2FPError):
    """The webhook leads to an address the service does not call (M2FP_WEBHOOK_ALLOW)."""

    code, status = "webhook_refused", 400


class NotFound(M2FPError):
    code, status = "not_found", 404


class ResultNotReady(M2FPError):
    """An output was asked for before its task succeeded."""

    code, status = "result_not_ready", 409


class IdempotencyKeyInProgress(M2FPError):
    """A retry arrived while the first request with its Idempotency-Key is still being
    admitted: one of them must create the work, and it is not this one."""

    code, status = "idempotency_key_in_progress", 409
    retry_after_s = 1


class PayloadTooLarge(M2FPError):
    code, status = "payload_too_large", 413


class UnsupportedMediaType(M2FPError):
    code, status = "unsupported_media_type", 415


class InvalidImage(M2FPError):
    code, status = "invalid_image", 422


class IdempotencyKeyReused(M2FPError):
    """An Idempotency-Key sent again with a different photo or options."""

    code, status = "idempotency_key_reused", 422


class ImageTooLarge(M2FPError):
    code, status = "image_too_large", 422


class ImageTooSmall(M2FPError):
    code, status = "image_too_small", 422


class ModelUnavailable(M2FPError):
    """No weights could be found or fetched; the message says how to provide them."""

    code, status = "model_unavailable", 503


class QueueFull(M2FPError):
    """No queue place; `retry_after_s` says when one is likely free for this caller."""

    code, status = "queue_full", 503


class NotLoaded(M2FPError):
    """The model is still loading, or (cluster mode) no worker has registered yet."""

    code, status = "not_ready", 503


class Draining(M2FPError):
    """The service is shutting down and takes no new work."""

    code, status = "not_ready", 503


# --- how a task ends failed when its photo did not fail it (Task.error) ------------------

class TaskFailure(CodedError):
    """Recorded as a task's `error`, never answered to a request; the status is unused."""

    default_message = "The task failed unexpectedly."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class TimedOut(TaskFailure):
    code = "timeout"
    default_message = "The task took longer than the service's time limit."


class ShutDown(TaskFailure):
    code = "shutdown"
    default_message = "The service shut down before the task could finish."


class OutOfMemory(TaskFailure):
    code = "out_of_memory"
    default_message = "The photo needed more memory than the service has."


class WorkerLost(TaskFailure):
    code = "worker_lost"
    default_message = "The worker running this task stopped."


# --- the infrastructure's and the transport's ------------------------------------------

class StoreUnavailable(CodedError):
    """The task store (Redis) is unreachable, loading, or refuses writes. Not an
    M2FPError: the caller's request is fine and is answered 503 whole, never stored as a
    task's or a batch item's failure."""

    code, status = "store_unavailable", 503
    retry_after_s = 2

    def __init__(self, reason: str) -> None:
        super().__init__("The task store is unreachable; retry shortly.")
        self.reason = reason  # for the log, not for the caller

    def __str__(self) -> str:
        return f"{self.message} ({self.reason})"


class Unauthorized(CodedError):
    code, status = "unauthorized", 401


class MethodNotAllowed(CodedError):
    code, status = "method_not_allowed", 405


class RequestTimeout(CodedError):
    """The head or the body arrived too slowly, or stalled while others needed its room."""

    code, status = "request_timeout", 408


class HeadersTooLarge(CodedError):
    code, status = "headers_too_large", 431


class UploadsBusy(CodedError):
    """The bodies arriving already hold the upload budget."""

    code, status = "uploads_busy", 503


class TooManyConnections(CodedError):
    code, status = "too_many_connections", 503


# the codes of the statuses a framework HTTPException may carry (routing, static files,
# form parsing)
FRAMEWORK_CODES = {error.status: error.code for error in (
    BadRequest, Unauthorized, NotFound, MethodNotAllowed, ResultNotReady, PayloadTooLarge,
    UnsupportedMediaType, NotLoaded)}


def framework_code(status: int) -> str:
    """The code a framework HTTPException with this status is answered with."""
    return FRAMEWORK_CODES.get(status, "error")
