"""API keys, checked from the request head before a byte of the body is read.

FastAPI reads a form body before a route's dependencies run, so a key check written as
a dependency would let any client upload first. This middleware answers 401 from the
head alone (and closes the connection, so the unread body is dropped), and records who
the caller is as `request.state.owner`: a short digest of the key, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Unauthorized
from .limits import has_body, send_error

OWNER_HEX_CHARS = 16
BEARER = "bearerAuth"
API_KEY_HEADER = "apiKeyHeader"


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:OWNER_HEX_CHARS]


@dataclass(frozen=True)
class OpenPaths:
    """Paths answered without a key: exact entries, and `/prefix/*` for a whole subtree."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def parse(cls, entries: list[str]) -> "OpenPaths":
        prefixes = tuple(e[:-1] for e in entries if e.endswith("/*"))
        return cls(frozenset(e for e in entries if not e.endswith("/*")), prefixes)

    def __contains__(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys, kept as SHA-256 digests (compared in constant time)."""

    digests: tuple[bytes, ...]

    @classmethod
    def parse(cls, setting: str | None) -> "ApiKeys":
        keys = [k.strip() for k in (setting or "").split(",") if k.strip()]
        return cls(tuple(hashlib.sha256(k.encode()).digest() for k in keys))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def owner(self, given: str) -> str | None:
        """The owner id of a configured key, None for any other string."""
        digest = hashlib.sha256(given.encode()).digest()
        matched = False
        for known in self.digests:  # no early exit: the time does not tell which key matched
            matched |= hmac.compare_digest(digest, known)
        return owner_of(given) if matched else None


def presented_key(scope: Scope) -> str:
    headers = dict(scope.get("headers") or [])
    given = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if not given and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given


class Authenticate:
    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: OpenPaths) -> None:
        self.app, self.keys, self.open_paths = app, keys, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        owner = self.keys.owner(presented_key(scope)) if self.keys else None
        scope.setdefault("state", {})["owner"] = owner
        if self.keys and owner is None and scope["path"] not in self.open_paths:
            await send_error(send, Unauthorized(
                "A valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)."),
                {"www-authenticate": "Bearer"}, close=has_body(scope))
            return
        await self.app(scope, receive, send)


def declare_security(spec: dict, open_paths: OpenPaths, required: bool) -> dict:
    """Declare the two ways to present a key, and on every operation outside the open paths
    the 401 and the key requirement (optional while no key is configured)."""
    spec.setdefault("components", {})["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
        API_KEY_HEADER: {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    requirement = [{BEARER: []}, {API_KEY_HEADER: []}] + ([] if required else [{}])
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, methods in spec["paths"].items():
        if path in open_paths:
            continue
        for op in methods.values():
            op["security"] = requirement
            op["responses"].setdefault("401", {"description": "Unauthorized",
                                               "content": {"application/json": {"schema": error_ref}}})
    return spec
