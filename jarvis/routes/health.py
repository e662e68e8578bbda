"""Liveness (`/health`) and readiness (`/health/ready`) of the server and its engine."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.response import Response


def health_body(runtime: Any) -> dict[str, Any]:
    stats = runtime.engine.stats
    return {
        "status": runtime.state,
        "engine": runtime.settings.inference_engine,
        "model": runtime.model_id if runtime.ready else None,
        "error": runtime.failure,
        "requests_in_flight": stats.in_flight,
        "requests_waiting": runtime.admission.waiting,
        "requests_total": stats.requests_started,
        "requests_cancelled": stats.requests_cancelled,
        "tokens_generated": stats.tokens_generated,
        "forward_passes": stats.forward_passes,
        "engine_restarts": runtime.restarts,
        "start_attempts": runtime.start_attempts,
        "next_start_attempt": runtime.next_start_attempt,
    }


@get("/health", tags=["Health"], summary="Liveness: 200 while the process serves, with engine state.")
async def health(request: Request) -> dict[str, Any]:
    return health_body(request.app.state.runtime)


@get("/health/ready", tags=["Health"], summary="Readiness: 200 once the engine serves, 503 before or after.")
async def ready(request: Request) -> Response:
    runtime = request.app.state.runtime
    return Response(health_body(runtime), status_code=200 if runtime.ready else 503)
