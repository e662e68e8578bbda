"""GET /metrics: the Prometheus text exposition, open or behind JARVIS_API_KEYS.

It sits outside /v1 (where Prometheus expects it), so the server's API-key
guard leaves it alone; `JARVIS_TELEMETRY_METRICS_REQUIRE_API_KEY=true` makes
this handler ask for `Authorization: Bearer <key>` itself.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request, get
from litestar.response import Response

from jarvis.server import server_of


def metrics_allowed(request: Request, recorder: Any) -> bool:
    """True when /metrics is open, or the request carries one of JARVIS_API_KEYS as a bearer token."""
    if not recorder.settings.metrics_require_api_key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    supplied = token.strip().encode()
    matched = False
    for key in server_of(request).settings.all_api_keys:  # every key compared: timing does not tell which
        matched |= hmac.compare_digest(supplied, key.encode())
    return scheme.lower() == "bearer" and matched


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics_endpoint(request: Request) -> Response:
    recorder = server_of(request).extensions["telemetry"]
    if not metrics_allowed(request, recorder):
        return Response({"error": {"message": "GET /metrics requires `Authorization: Bearer <key>` with one of "
                                              "the keys in JARVIS_API_KEYS.", "type": "authentication_error",
                                   "param": None, "code": "invalid_api_key"}}, status_code=401)
    body, content_type = recorder.metrics.render()
    return Response(body, media_type=content_type)
