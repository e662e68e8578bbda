"""The Litestar application: a bootstrap's plugins and registries → runtime → routes, errors and lifespan.

`create_app` refuses a bootstrap with problems (settings, plugin names, engine settings) before the server
binds; the engine is built once, by the runtime's supervisor, and the model loads in the background so
`/health` answers at once and `/v1/*` returns 503 until ready. Plugins get the `JarvisServer`
(`jarvis.server`) in their lifespan hooks and through `server_of(request)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

import jarvis
from jarvis.auth import KeyRing, access_guard
from jarvis.bootstrap import Bootstrap, bootstrap
from jarvis.errors import APIError
from jarvis.routes.adapters import AdapterController
from jarvis.routes.health import health, ready
from jarvis.routes.messages import MessagesController, anthropic_error
from jarvis.routes.openai import OpenAIController
from jarvis.routes.openapi_docs import document_errors
from jarvis.routes.responses import ResponsesController
from jarvis.routes.tokenizer import TokenizerController
from jarvis.runtime import EngineRuntime
from jarvis.server import JarvisServer
from jarvis.shedding import shed_when_full

log = logging.getLogger("jarvis.app")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}


def api_error_response(_: Request, exc: APIError) -> Response:
    return Response(exc.to_body(), status_code=exc.status_code, headers=exc.headers or None)


def http_error_response(request: Request, exc: HTTPException) -> Response:
    if request.url.path.startswith("/v1/messages"):  # no route matched there: still Anthropic's API
        return anthropic_error(request, exc)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return Response({"error": {"message": detail, "type": _ERROR_TYPES.get(status, "server_error"),
                               "param": None, "code": None}},
                    status_code=status, headers=getattr(exc, "headers", None))


def unexpected_error_response(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return Response({"error": {"message": f"Internal server error: {type(exc).__name__}",
                               "type": "server_error", "param": None, "code": None}},
                    status_code=HTTP_500_INTERNAL_SERVER_ERROR)


#: Loggers of the HTTP clients engines and plugins use: a line per request at INFO (the upstream engine's every
#: call), which costs the event loop more than the proxying itself. Shown again at JARVIS_LOG_LEVEL=debug.
CLIENT_LOGGERS = ("httpx", "httpcore")


def quiet_client_logs(level: str) -> None:
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level.lower() in ("debug", "trace") else logging.WARNING)


def create_app(boot: Bootstrap | None = None,
               on_engine_failure: Callable[[str], None] | None = None) -> Litestar:
    """The app over `boot` (settings, plugins, registries; built here when not given), refused with every
    problem found before anything starts. `on_engine_failure(reason)`: called once when the engine fails its
    first start (and JARVIS_ENGINE_START_RETRY is off); `jarvis serve` stops the server with a non-zero exit."""
    boot = boot or bootstrap()
    boot.require_valid()
    settings, pm = boot.settings, boot.plugins
    quiet_client_logs(settings.log_level)
    runtime = EngineRuntime(settings, boot.registries, pm.relay)
    keys = KeyRing.from_settings(settings)
    server = JarvisServer(settings, runtime, pm, keys)

    extra_routes: list[Any] = []
    pm.hook.jarvis_register_routes(register=extra_routes.append)
    middleware: list[Any] = [shed_when_full(runtime.admission)]  # first: the outermost layer
    pm.hook.jarvis_register_middleware(register=middleware.append)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pm.hook.jarvis_startup(app=app, server=server)
        loader = asyncio.create_task(runtime.serve_engine(on_engine_failure), name="engine-start")
        loader.add_done_callback(lambda t: t.cancelled() or t.exception())  # failure is kept in runtime
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await runtime.stop()
            pm.hook.jarvis_shutdown(app=app, server=server)

    app = Litestar(
        route_handlers=[OpenAIController, ResponsesController, MessagesController, AdapterController,
                        TokenizerController, health, ready, *extra_routes],
        lifespan=[lifespan],
        middleware=middleware,
        guards=[access_guard(settings, keys)],
        request_max_body_size=settings.max_request_bytes,
        exception_handlers={APIError: api_error_response, HTTPException: http_error_response,
                            Exception: unexpected_error_response},
        openapi_config=OpenAPIConfig(title="Jarvis", version=jarvis.__version__,
                                     description="OpenAI-compatible LLM server."),
        debug=False,
    )
    document_errors(app)
    app.state.jarvis = server
    return app
