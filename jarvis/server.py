"""The server as plugins see it: one small typed object instead of the web framework's state bag.

`jarvis_startup(server)` and `jarvis_shutdown(server)` receive it, and a plugin's route handler finds it with
`server_of(request)`. It holds the resolved settings, the runtime (`jarvis.runtime.Runtime`: models,
readiness, prepare/generate/stream), the plugin manager, the API keys (`jarvis.auth.KeyRing`: who a key is,
its owner hash and scopes), and `extensions`: a place where a plugin keeps
what it started, under its own name (`server.extensions["batch"]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy
    from litestar import Litestar, Request

    from jarvis.auth import KeyRing
    from jarvis.runtime import Runtime
    from jarvis.settings import JarvisSettings


@dataclass
class JarvisServer:
    settings: JarvisSettings
    runtime: Runtime
    #: The plugin manager (`jarvis.plugin_manager.JarvisPluginManager`).
    plugins: pluggy.PluginManager
    keys: KeyRing
    #: A plugin's own running parts, under the plugin's name.
    extensions: dict[str, Any] = field(default_factory=dict)


def server_of(request_or_app: Request | Litestar) -> JarvisServer:
    """The server that serves this request (or app)."""
    app = getattr(request_or_app, "app", request_or_app)
    return app.state.jarvis
