"""What routes take through FastAPI's dependencies: the service core, and the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..tasks.service import Service


# async: FastAPI would run plain functions in its thread pool, a hop for nothing here
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_owner(request: Request) -> str | None:
    """The caller's key, as the Authenticate middleware recorded it (None without keys)."""
    return getattr(request.state, "owner", None)


ServiceDep = Annotated[Service, Depends(get_service)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
