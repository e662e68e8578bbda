"""BatchService: the server side of batch jobs: start them, resume them after a restart, cancel them.

Created at server start (`jarvis_startup`). Every active job in the store is
resumed once the engine is ready (it loads in the background); new jobs start
as they are created. Each job runs as one asyncio task on the server's loop.
"""

from __future__ import annotations

import asyncio
import logging

from jarvis.plugins.batch.runner import BatchJobRunner
from jarvis.plugins.batch.settings import BatchSettings
from jarvis.plugins.batch.store import BatchJobStore
from jarvis.runtime import EngineRuntime

log = logging.getLogger("jarvis.batch")

COMPLETION_WINDOWS = {"24h": 24 * 3600}


class BatchService:
    def __init__(self, store: BatchJobStore, runtime: EngineRuntime, settings: BatchSettings) -> None:
        self.store = store
        self.runtime = runtime
        self.settings = settings
        self.runner = BatchJobRunner(store, runtime, concurrency=settings.concurrency,
                                     max_lines=settings.max_lines)
        self._tasks: dict[str, asyncio.Task] = {}

    def resume_all(self) -> None:
        """Start a task for every job a previous server left unfinished."""
        active = self.store.active_batches()
        if active:
            log.info("resuming %d batch job(s): %s", len(active), ", ".join(active))
        for batch_id in active:
            self.launch(batch_id)

    def launch(self, batch_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(batch_id), name=f"batch-{batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda t: self._tasks.pop(batch_id, None) if self._tasks.get(batch_id) is t
                               else None)

    async def _drive(self, batch_id: str) -> None:
        while self.runtime.state == "loading":
            await asyncio.sleep(0.1)
        if not self.runtime.ready:
            log.error("batch %s waits: the engine is %s (%s); it resumes at the next start", batch_id,
                      self.runtime.state, self.runtime.failure)
            return
        try:
            await self.runner.run(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s stopped by an unexpected error; it resumes at the next start", batch_id)

    async def cancel(self, batch_id: str) -> None:
        """Mark a job cancelling; its runner stops and finalizes it as cancelled."""
        await self.store.run(self.store.set_status, batch_id, "cancelling")
        if batch_id in self._tasks:
            self.runner.stop(batch_id, "cancelled")
        else:
            self.launch(batch_id)

    def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
