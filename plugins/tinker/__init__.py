"""Tinker plugin: the Tinker training API under /api/v1, so the official `tinker` SDK trains and samples here.

A client creates LoRA training clients on the served base model, runs forward/backward and optimizer steps
on Jarvis's trainer (PEFT, on CPU or CUDA), saves weights for a sampler (published hot to the serving
engine) and samples from them through the same engine that serves /v1: the loop of supervised fine-tuning
and of RL, driven step by step. Needs the [tinker] extra (the SDK's types and protobuf schema, PEFT).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from jarvis import hookimpl

if TYPE_CHECKING:
    from jarvis.server import JarvisServer

log = logging.getLogger("jarvis.tinker")


def tinker_settings() -> Any:
    from jarvis.plugins.tinker.settings import PREFIX, TinkerSettings
    from jarvis.settings import load_settings

    return load_settings(TinkerSettings, PREFIX)


def _available() -> bool:
    """Whether the [tinker] extra is installed. Found, not imported: importing PEFT pulls in transformers and
    torch, seconds of a server's start that only the first training client needs."""
    missing = [name for name in ("peft", "tinker") if importlib.util.find_spec(name) is None]
    if missing:
        log.info("Tinker API off: no module named %s (install the extra: pip install 'jarvis-llm[tinker]')",
                 " or ".join(repr(name) for name in missing))
        return False
    return True


@hookimpl
def jarvis_check_settings(settings: Any) -> list[Any]:
    from jarvis.settings import SettingsError

    try:
        tinker_settings()
    except SettingsError as exc:
        return exc.problems
    return []


@hookimpl
def jarvis_register_routes(register: Any) -> None:
    if tinker_settings().enabled and _available():
        from jarvis.plugins.tinker.routes import TinkerController

        register(TinkerController)


@hookimpl
def jarvis_startup(server: JarvisServer) -> None:
    settings = tinker_settings()
    if settings.enabled and _available():
        from jarvis.plugins.tinker.service import TinkerService

        server.extensions["tinker"] = TinkerService(settings, server)


@hookimpl
def jarvis_shutdown(server: JarvisServer) -> None:
    service = server.extensions.get("tinker")
    if service is not None:
        service.stop()  # unfinished work is marked failed in the store at the next start
