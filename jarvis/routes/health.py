"""Liveness (`/health`) and readiness (`/health/ready`) of the server and its engine."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.response import Response

from jarvis.server import server_of


@get("/health", tags=["Health"], summary="Liveness: 200 while the process serves, with engine state.")
async def health(request: Request) -> dict[str, Any]:
    return server_of(request).runtime.health()


@get("/health/ready", tags=["Health"], summary="Readiness: 200 once the engine serves, 503 before or after.")
async def ready(request: Request) -> Response:
    runtime = server_of(request).runtime
    return Response(runtime.health(), status_code=200 if runtime.ready else 503)
