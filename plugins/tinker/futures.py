"""Futures: every Tinker work request is accepted at once with a `request_id` and runs in the background.

`submit` records the future (durably) and starts its work; work on one training model runs in the order it
was accepted (the SDK sends a model's requests one after another, in `seq_id` order), work on different
models at once. `wait` is the long poll behind `retrieve_future`: it answers as soon as the result is there,
or after `poll_wait_s` with the still-pending row. A result is stored with its content type (JSON, or the
SDK's protobuf for forward/backward and samples) before the poll that reads it is answered.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from jarvis.auth import Principal
from jarvis.errors import RateLimited
from jarvis.plugins.tinker.store import TinkerStore

log = logging.getLogger("jarvis.tinker")

JSON = "application/json"
PROTOBUF = "application/x-protobuf"


@dataclass
class Outcome:
    body: bytes
    content_type: str = JSON


class RequestFailed(Exception):
    """A request that cannot be done: `category` user (the request is wrong) or server (Jarvis failed)."""

    def __init__(self, message: str, category: str = "user") -> None:
        super().__init__(message)
        self.message = message
        self.category = category


class Futures:
    def __init__(self, store: TinkerStore, max_pending: int) -> None:
        self.store = store
        self.max_pending = max_pending
        self._done: dict[str, asyncio.Event] = {}
        self._lanes: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._once: dict[tuple[str, int], str] = {}  # (lane, seq_id) -> the request id that answered it

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def submit(self, owner: str | None, kind: str, work: Callable[[], Awaitable[Outcome]],
                     lane: str | None = None, seq_id: int | None = None) -> str:
        """Accept `work` (after the earlier work of the same `lane`, a training model); its request id. The
        SDK resends a request whose answer it missed with the same `seq_id`: the lane's request of that
        `seq_id` is not run again, its request id is answered."""
        once = (lane, seq_id) if lane is not None and seq_id is not None else None
        if once is not None and once in self._once:
            log.info("tinker %s: %s seq_id %s sent again; answering its first request", kind, lane, seq_id)
            return self._once[once]
        if self.pending >= self.max_pending:
            raise RateLimited(f"The Tinker service has {self.pending} requests in progress "
                              f"(JARVIS_TINKER_MAX_PENDING={self.max_pending}); retry after the Retry-After delay.",
                              1.0, code="tinker_queue_full")
        request_id = f"req-{uuid.uuid4().hex}"
        await self.store.run(self.store.add_future, request_id, owner, kind)
        done = self._done[request_id] = asyncio.Event()
        before = self._lanes.get(lane) if lane else None
        task = asyncio.create_task(self._run(request_id, kind, work, before, done), name=f"tinker-{kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if lane:
            self._lanes[lane] = task
        if once is not None:
            self._once[once] = request_id
        return request_id

    def forget(self, lane: str) -> None:
        """A lane (a training model) is gone: drop what it kept."""
        self._lanes.pop(lane, None)
        for key in [k for k in self._once if k[0] == lane]:
            del self._once[key]

    async def _run(self, request_id: str, kind: str, work: Callable[[], Awaitable[Outcome]],
                   before: asyncio.Task | None, done: asyncio.Event) -> None:
        if before is not None:
            await asyncio.wait([before])  # in order, whatever the earlier request's outcome
        try:
            outcome = await work()
            ended: tuple[Any, ...] = ("done", outcome.content_type, outcome.body, None, None)
        except RequestFailed as exc:
            ended = ("failed", None, None, exc.message, exc.category)
        except asyncio.CancelledError:
            ended = ("failed", None, None, "The server stopped before this request finished; send it again.",
                     "server")
        except Exception as exc:  # a bug or a failure of the trainer or the engine: the client learns why
            log.exception("tinker %s %s failed", kind, request_id)
            ended = ("failed", None, None, f"{kind} failed on the server: {type(exc).__name__}: {exc}", "server")
        try:
            await self.store.run(self.store.end_future, request_id, *ended)
        finally:
            done.set()
            self._done.pop(request_id, None)

    async def wait(self, request_id: str, viewer: Principal, timeout: float) -> dict[str, Any] | None:
        """The future's row once it ended, or still pending after `timeout`; None when the caller has no
        such future."""
        event = self._done.get(request_id)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                pass
        return await self.store.run(self.store.future, request_id, viewer)

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
