"""Shedding at the door: while every generation slot is busy and the queue is full, a new generation request
is answered 429 before any of its work is done.

`JARVIS_MAX_CONCURRENT` and `JARVIS_MAX_QUEUE` bound the generations the runtime holds (`jarvis.limits`);
the runtime refuses the one past them once its body is parsed and its route has run. Past the server's CPU
ceiling (a proxy in front of a fast upstream) that is too late: the refusals themselves queue behind the
work and the 200s delivered fall. This ASGI layer, the outermost of every route's middleware (it runs after
Litestar's route lookup, before the key check, the handler and the body read), answers such a request from
its method and path alone, in the shape of its API, so refusing costs a fraction of serving. It is not
enough at twice the CPU ceiling (bench/proxy_load.py). A refusal still costs uvicorn's parse, two socket
writes and an access-log line: ~125 us against ~470 us for a served request, from a door outside the whole
app that shed by the event loop's lag. Served S and refused R share one core, S*c_served + R*c_refused = 1 s,
which at 2x the ceiling leaves 0.64 of it served (measured 0.64; this door with JARVIS_MAX_CONCURRENT=32 and
no queue: 0.55), below the 0.87-0.96 that queueing every request delivers. So nothing is shed by CPU load.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from jarvis import protocol_anthropic as awire
from jarvis.limits import Admission

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

#: The routes whose requests take a generation slot.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                              "/v1/embeddings"})


def shed_when_full(admission: Admission) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware factory: `admission` is the runtime's."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def shed(scope: Scope, receive: Any, send: Any) -> None:
            if (admission.full and scope["type"] == "http" and scope["method"] == "POST"
                    and scope["path"].rstrip("/") in GENERATION_PATHS):
                error = admission.overloaded()
                body = awire.error_body(429, error.message) if scope["path"].startswith("/v1/messages") \
                    else error.to_body()
                payload = json.dumps(body).encode()
                await send({"type": "http.response.start", "status": 429, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]})
                await send({"type": "http.response.body", "body": payload})
                return
            await app(scope, receive, send)

        return shed

    return middleware
