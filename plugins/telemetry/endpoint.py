"""GET /metrics: the Prometheus text exposition.

It sits outside /v1 (where Prometheus expects it). Who may read it is JARVIS_TELEMETRY_METRICS_ACCESS:
open (the default: a scrape on loopback needs no key), key (any API key) or admin; the server's access
guard (`jarvis.auth`) enforces it like every route's level.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.response import Response

from jarvis.server import server_of


def metrics_endpoint(access: str) -> Any:
    """The route handler, at access level `access`."""

    @get("/metrics", include_in_schema=False, sync_to_thread=False, opt={"access": access})
    def metrics(request: Request) -> Response:
        body, content_type = server_of(request).extensions["telemetry"].metrics.render()
        return Response(body, media_type=content_type)

    return metrics
