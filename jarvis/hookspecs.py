"""The plugin contract: every hook Jarvis calls, one docstring each.

A plugin is any module listed under the `jarvis` entry-point group that
defines functions named like these, decorated with `jarvis.hookimpl`.
Hooks receive a `register` callback instead of returning structures, so a
plugin may register any number of things and the order stays explicit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    from litestar import Litestar

    from jarvis.engine import GenerationResult, PreparedRequest
    from jarvis.server import JarvisServer

PROJECT = "jarvis"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def jarvis_register_engines(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Call `register(name, factory, options=SettingsClass)`; `factory(settings)` returns an `Engine` (see
    jarvis.engine); `options`, optional, is the engine's own pydantic-settings class (`jarvis doctor` shows it)."""


@hookspec
def jarvis_register_chat_formats(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Call `register(name, factory)`; `factory(model_info)` returns a `ChatFormat` (see jarvis.chat_format)."""


@hookspec
def jarvis_register_routes(register: Callable[[Any], None]) -> None:
    """Call `register(handler_or_controller)` for each Litestar route handler or Controller to mount."""


@hookspec
def jarvis_register_middleware(register: Callable[[Any], None]) -> None:
    """Call `register(middleware)` with a Litestar middleware (ASGI factory `app -> app`) wrapping every request."""


@hookspec
def jarvis_register_commands(cli: click.Group) -> None:
    """Add click commands or groups to the `jarvis` CLI (`cli.add_command(...)`)."""


@hookspec
def jarvis_check_settings(settings: Any) -> list[Any]:
    """Return a list of `ConfigError`s for the plugin's own settings (empty if fine); `doctor` and `serve` print
    them."""
    return []


@hookspec
def jarvis_startup(app: Litestar, server: JarvisServer) -> None:
    """The server is starting (engine loading in the background): acquire the plugin's resources and keep them
    in `server.extensions[<plugin name>]` (`app` is the Litestar app, for what only it has)."""


@hookspec
def jarvis_shutdown(app: Litestar, server: JarvisServer) -> None:
    """The server is stopping: release what `jarvis_startup` acquired."""


@hookspec
def jarvis_request_started(request: PreparedRequest) -> None:
    """A generation is about to reach the engine; must be fast (one that raises is logged, and the other
    plugins still get the event). An embeddings request arrives too, as `kind` "embedding" (its result has
    prompt tokens only)."""


@hookspec
def jarvis_request_finished(request: PreparedRequest, result: GenerationResult | None,
                            error: BaseException | None) -> None:
    """A generation ended with `result` or `error` (cancelled streams arrive with an error; a stream's result
    has its logprobs)."""


@hookspec
def jarvis_adapter_published(adapter: Any) -> None:
    """A trained adapter is ready to serve (an `AdapterInfo`-like object with name and path)."""
