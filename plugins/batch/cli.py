"""`jarvis batch run IN.jsonl -o OUT.jsonl`: a batch file through the engine in-process, no server.

Same line format, validation and result records as /v1/batches. Progress
is committed to `OUT.jsonl.progress.sqlite3` as lines finish; after an
interruption, `--resume` runs only the lines without a committed result
(the input must be unchanged). Without `--errors`, failed lines are written
to OUT together with the successful ones, in input order.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
OFFLINE_BATCH_ID = "batch_offline"


@click.group("batch")
def batch_group() -> None:
    """OpenAI-format batch jobs (JSONL: custom_id, method, url, body) without a server."""


def progress_path(output: Path) -> Path:
    return output.with_name(output.name + ".progress.sqlite3")


def remove_progress(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


@batch_group.command("run")
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where the results go (JSONL, input order).")
@click.option("--errors", "errors_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write failed lines here instead of into OUT.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same input into the same OUT.")
@click.option("--concurrency", type=click.IntRange(1, 1024),
              help="Lines in flight at once (default JARVIS_BATCH_CONCURRENCY).")
def run_command(input_path: Path, output: Path, errors_path: Path | None, resume: bool,
                concurrency: int | None) -> None:
    """Run every request in IN.jsonl and write OUT.jsonl."""
    from jarvis.embedded_model import sha256_of
    from jarvis.plugins.batch import batch_settings
    from jarvis.plugins.batch.lines import first_endpoint
    from jarvis.plugins.batch.store import BatchJobStore
    from jarvis.settings import SettingsError

    try:
        settings = batch_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    endpoint = first_endpoint(input_path.read_bytes()) or "/v1/chat/completions"
    state = progress_path(output)
    if state.exists() and not resume:
        console.print(f"[yellow]![/] {state} holds an unfinished run; starting over (use --resume to continue it)")
        remove_progress(state)
    output.parent.mkdir(parents=True, exist_ok=True)
    store = BatchJobStore(output.parent, database=state)
    digest = sha256_of(input_path)
    row = store.batch_row(OFFLINE_BATCH_ID)
    if row is not None and row["input_sha256"] != digest:
        store.close()
        raise click.ClickException(f"{input_path} changed since the interrupted run recorded in {state}; "
                                   "run again without --resume to start over.")
    if row is None:
        if resume:
            console.print("[yellow]![/] nothing to resume; starting from the first line")
        store.create_batch(batch_id=OFFLINE_BATCH_ID, endpoint=endpoint, completion_window="none",
                           input_path=input_path.resolve(), input_sha256=digest)
    status = asyncio.run(run_offline(store, concurrency or settings.concurrency, settings.max_lines))
    summary = write_results(store, status, output, errors_path)
    store.close()
    if status == "completed":
        remove_progress(state)
    click.echo(json.dumps(summary))
    if status != "completed":
        sys.exit(1)


async def run_offline(store: Any, concurrency: int, max_lines: int) -> str:
    from jarvis.bootstrap import current_bootstrap
    from jarvis.plugins.batch.runner import BatchJobRunner
    from jarvis.runtime import EngineRuntime
    from jarvis.settings import SettingsError

    boot = current_bootstrap()
    if boot.problems:
        raise click.ClickException(str(SettingsError(boot.problems)))
    settings = boot.settings
    runtime = EngineRuntime(settings, boot.registries, boot.plugins.relay)
    with console.status(f"loading the {settings.inference_engine} engine ..."):
        try:
            await runtime.start()
        except Exception as exc:
            raise click.ClickException(f"the engine did not start: {exc}") from None
    runner = BatchJobRunner(store, runtime, concurrency=concurrency, max_lines=max_lines, publish=False)
    columns = (TextColumn("[bold]batch[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
               TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("lines", total=None, ok=0, failed=0)

            def started(total: int, done: int) -> None:
                ok, failed = store.counts(OFFLINE_BATCH_ID)
                progress.update(task, total=total, completed=done, ok=ok, failed=failed)

            def finished(ok: bool) -> None:
                fields = progress.tasks[0].fields
                key = "ok" if ok else "failed"
                progress.update(task, advance=1, **{key: fields[key] + 1})

            runner.on_start, runner.on_result = started, finished
            return await runner.run(OFFLINE_BATCH_ID)
    finally:
        await runtime.stop()


def write_results(store: Any, status: str, output: Path, errors_path: Path | None) -> dict[str, Any]:
    row = store.batch_row(OFFLINE_BATCH_ID)
    completed, failed = store.counts(OFFLINE_BATCH_ID)
    summary: dict[str, Any] = {"status": status, "total": row["total"] if row else 0,
                               "completed": completed, "failed": failed, "output": str(output)}
    if status == "failed" and row and row["errors"]:
        summary["errors"] = json.loads(row["errors"])
        return summary
    if errors_path is not None:
        store.export(OFFLINE_BATCH_ID, True, output)
        store.export(OFFLINE_BATCH_ID, False, errors_path)
        summary["errors_file"] = str(errors_path)
    else:
        store.export(OFFLINE_BATCH_ID, None, output)
    return summary
