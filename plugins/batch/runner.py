"""BatchJobRunner: run one batch job to the end through the engine, resumable after a crash.

A run validates the input (once), records every malformed line as an error,
then sends the lines that have no committed result yet through the same
code path as the HTTP routes, many at a time (bounded by a semaphore shared
by every job, so the engine's own batching fills). Each result is committed
to the store before it counts. Cancelling or expiry stops new lines, and the
lines that never ran are reported as such. If the engine goes away (the
server is stopping), the run ends as `interrupted` and the job stays active,
to resume where it stopped. Store work (reading the input, committing each
result, writing the result files) runs on the store's thread, never on the
event loop. Responses lines act as the batch's owner: what they store is
theirs, and `previous_response_id` finds only their responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jarvis import protocol_anthropic as awire
from jarvis.auth import owner_principal
from jarvis.errors import APIError, EngineFailure
from jarvis.plugins.batch.lines import BatchLine, parse_input, validate_line_body
from jarvis.plugins.batch.store import TERMINAL, BatchJobStore
from jarvis.runtime import EngineRuntime
from jarvis.serving.chat import create_chat_completion
from jarvis.serving.completions import create_completion
from jarvis.serving.embeddings import create_embeddings
from jarvis.serving.messages import create_message
from jarvis.serving.responses import create_response

log = logging.getLogger("jarvis.batch")

INTERRUPTED = "interrupted"
#: What runs one line of each endpoint: the same serving call as its HTTP route (non-streamed).
ENDPOINT_CALLS = {"/v1/chat/completions": create_chat_completion, "/v1/completions": create_completion,
                  "/v1/responses": create_response, "/v1/embeddings": create_embeddings,
                  "/v1/messages": create_message}
_STOP_CODES = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request ran."),
               "expired": ("batch_expired", "the batch expired before this request ran.")}


class JobInterrupted(Exception):
    """The engine stopped under a running line; the job resumes at the next start."""


def request_record(custom_id: str | None, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": f"req_{uuid.uuid4().hex[:24]}",
                         "body": body},
            "error": None}


def line_error_record(custom_id: str | None, error: dict[str, str]) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": None,
            "error": error}


class BatchJobRunner:
    def __init__(self, store: BatchJobStore, runtime: EngineRuntime, *, concurrency: int, max_lines: int,
                 publish: bool = True) -> None:
        self.store = store
        self.runtime = runtime
        self.max_lines = max_lines
        self.publish = publish  # write output/error files into the store (the server); offline exports itself
        self._slots = asyncio.Semaphore(concurrency)
        self._stops: dict[str, str] = {}
        self._running: dict[str, set[asyncio.Task]] = {}
        self.on_start: Callable[[int, int], None] | None = None  # (total lines, lines already done)
        self.on_result: Callable[[bool], None] | None = None  # one more line done (ok or not)

    def stop(self, batch_id: str, reason: str) -> None:
        """End a job early: `cancelled` or `expired`; lines in flight are abandoned."""
        self._stops.setdefault(batch_id, reason)
        for task in list(self._running.get(batch_id, ())):
            task.cancel()

    async def run(self, batch_id: str) -> str:
        """Run a job from wherever it stands; returns its final status, or `interrupted`."""
        row = await self.store.run(self.store.batch_row, batch_id)
        if row is None or row["status"] in TERMINAL:
            return row["status"] if row else "missing"
        if row["status"] == "cancelling":
            self._stops.setdefault(batch_id, "cancelled")
        lines = await self.store.run(self._load, row)
        if lines is None:
            return "failed"
        done = await self.store.run(self._record_malformed, batch_id, lines)
        if self.on_start:
            self.on_start(len(lines), len(done))
        pending = [line for line in lines if line.line not in done]
        if row["status"] in ("validating", "in_progress"):
            try:
                await self._run_lines(row, pending)
            except JobInterrupted:
                log.warning("batch %s interrupted (engine %s); it resumes at the next start", batch_id,
                            self.runtime.state)
                return INTERRUPTED
            finally:
                self._running.pop(batch_id, None)
        reason = self._stops.pop(batch_id, None)
        return await self.store.run(self._finish, batch_id, lines, reason)

    def _record_malformed(self, batch_id: str, lines: list[BatchLine]) -> set[int]:
        """Commit an error result for every malformed line; the lines done so far."""
        for line in lines:
            if line.error is not None:
                self.store.record_result(batch_id, line.line, line.custom_id, False,
                                         line_error_record(line.custom_id, line.error))
        return self.store.done_lines(batch_id)

    def _load(self, row: dict[str, Any]) -> list[BatchLine] | None:
        path = self.store.file_path(row["input_file_id"]) if row["input_file_id"] else Path(row["input_path"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            return self._fail(row["id"], "input_file_missing", f"The input file cannot be read: {exc}.")
        lines = parse_input(data, row["endpoint"])
        if row["status"] == "validating":
            if not lines:
                return self._fail(row["id"], "empty_file", "The input file has no requests.")
            if len(lines) > self.max_lines:
                return self._fail(row["id"], "too_many_requests",
                                  f"The input file has {len(lines)} requests; at most {self.max_lines} "
                                  "are allowed (JARVIS_BATCH_MAX_LINES).")
            self.store.set_status(row["id"], "in_progress", total=len(lines))
            row["status"] = "in_progress"
        return lines

    def _fail(self, batch_id: str, code: str, message: str) -> None:
        log.warning("batch %s failed: %s", batch_id, message)
        self.store.set_status(batch_id, "failed", errors=[{"code": code, "message": message, "param": None,
                                                            "line": None}])
        return None

    async def _run_lines(self, row: dict[str, Any], pending: list[BatchLine]) -> None:
        batch_id, expires_at = row["id"], row["expires_at"]
        running = self._running.setdefault(batch_id, set())
        interrupted: list[BaseException] = []

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            self._slots.release()
            if not task.cancelled() and isinstance(task.exception(), JobInterrupted):
                interrupted.append(task.exception())  # type: ignore[arg-type]

        try:
            for line in pending:
                if expires_at and time.time() > expires_at:
                    self._stops.setdefault(batch_id, "expired")
                if batch_id in self._stops or interrupted:
                    break
                await self._slots.acquire()
                if batch_id in self._stops or interrupted:
                    self._slots.release()
                    break
                task = asyncio.create_task(self._run_line(batch_id, row["endpoint"], line, row.get("owner")))
                running.add(task)
                task.add_done_callback(finished)
            await asyncio.gather(*running, return_exceptions=True)
        except asyncio.CancelledError:
            for task in running:
                task.cancel()
            raise
        if interrupted:
            raise interrupted[0]

    async def _run_line(self, batch_id: str, endpoint: str, line: BatchLine, owner: str | None) -> None:
        try:
            body = validate_line_body(line, endpoint)
            if endpoint == "/v1/responses":
                viewer = owner_principal(owner)
                payload = await create_response(self.runtime, body, viewer=viewer)  # type: ignore[arg-type]
            else:
                payload = await ENDPOINT_CALLS[endpoint](self.runtime, body)  # type: ignore[operator]
            status = 200
        except APIError as exc:
            if not self.runtime.ready:
                raise JobInterrupted() from exc
            status = exc.status_code
            payload = awire.error_body(status, exc.message) if endpoint == "/v1/messages" else exc.to_body()
        except Exception as exc:
            if not self.runtime.ready:
                raise JobInterrupted() from exc
            log.exception("batch %s line %d failed", batch_id, line.line)
            status, payload = 500, EngineFailure(f"{type(exc).__name__}: {exc}", code="engine_error").to_body()
        ok = status == 200
        if await self.store.run(self.store.record_result, batch_id, line.line, line.custom_id, ok,
                                request_record(line.custom_id, status, payload)) and self.on_result:
            self.on_result(ok)

    def _finish(self, batch_id: str, lines: list[BatchLine], reason: str | None) -> str:
        """Report the lines a stop left unrun, write the result files and end the job (the store's thread)."""
        if reason is not None:
            code, message = _STOP_CODES[reason]
            done = self.store.done_lines(batch_id)
            for line in lines:
                if line.line not in done:
                    error = {"code": code, "message": f"Line {line.line}: {message}"}
                    self.store.record_result(batch_id, line.line, line.custom_id, False,
                                             line_error_record(line.custom_id, error))
        final = reason or "completed"
        if final == "completed":
            self.store.set_status(batch_id, "finalizing")
        files = self.store.publish_results(batch_id) if self.publish else {}
        self.store.set_status(batch_id, final, **files)
        completed, failed = self.store.counts(batch_id)
        log.info("batch %s %s: %d completed, %d failed", batch_id, final, completed, failed)
        return final
