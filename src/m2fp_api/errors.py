"""Typed errors with a stable machine-readable `code` and the HTTP status it maps to.

Raised by the engine and the service alike; the API turns them into
`{"error": {"code", "message"}}`. Messages are written for the caller: they never
carry a path, a traceback or a library name.
"""

from __future__ import annotations


class M2FPError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(M2FPError):
    code, status = "bad_request", 400


class NotFound(M2FPError):
    code, status = "not_found", 404


class NotReady(M2FPError):
    """A result was asked for before the task succeeded."""

    code, status = "not_ready", 409


class PayloadTooLarge(M2FPError):
    code, status = "payload_too_large", 413


class UnsupportedMediaType(M2FPError):
    code, status = "unsupported_media_type", 415


class InvalidImage(M2FPError):
    code, status = "invalid_image", 422


class ImageTooLarge(M2FPError):
    code, status = "image_too_large", 422


class ImageTooSmall(M2FPError):
    code, status = "image_too_small", 422


class ModelUnavailable(M2FPError):
    """No weights could be found or fetched; the message says how to provide them."""

    code, status = "model_unavailable", 503
