"""Batch plugin: the OpenAI Batch API (/v1/files, /v1/batches) and offline `jarvis batch` JSONL jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jarvis import hookimpl

if TYPE_CHECKING:
    from jarvis.server import JarvisServer


def batch_settings() -> Any:
    from jarvis.plugins.batch.settings import PREFIX, BatchSettings
    from jarvis.settings import load_settings

    return load_settings(BatchSettings, PREFIX)


@hookimpl
def jarvis_check_settings(settings: Any) -> list[Any]:
    from jarvis.settings import SettingsError

    try:
        batch_settings()
    except SettingsError as exc:
        return exc.problems
    return []


@hookimpl
def jarvis_register_routes(register: Any) -> None:
    from jarvis.plugins.batch.routes import BatchesController, FilesController

    batch_settings()  # a bad JARVIS_BATCH_* value stops the server before it binds, naming the fix
    register(FilesController)
    register(BatchesController)


@hookimpl
def jarvis_register_commands(cli: Any) -> None:
    from jarvis.plugins.batch.cli import batch_group

    cli.add_command(batch_group)


@hookimpl
def jarvis_startup(server: JarvisServer) -> None:
    from jarvis.plugins.batch.service import BatchService
    from jarvis.plugins.batch.store import BatchJobStore

    settings = batch_settings()
    store = BatchJobStore(settings.root(server.settings.state_path))
    service = server.extensions["batch"] = BatchService(store, server.runtime, settings)
    service.resume_all()  # each job waits until the engine, loading in the background, is ready


@hookimpl
def jarvis_shutdown(server: JarvisServer) -> None:
    service = server.extensions.get("batch")
    if service is not None:
        service.stop()  # unfinished jobs stay active in the store and resume at the next start
