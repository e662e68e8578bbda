"""The engine's lifecycle: start it, watch it, restart it when it dies, say why it cannot serve.

`EngineSupervisor` owns the one engine instance (a restart replaces it) and its state — loading, ready,
restarting, failed, stopped — which `/health` reports and `require_ready` turns into a 503 for requests.
What must happen around a start (serving the adapters again) comes in as two callbacks, so the
supervisor knows engines and time, not adapters or requests.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from jarvis.engine import Engine, ModelInfo
from jarvis.errors import ConfigError, EngineUnavailable
from jarvis.registry import Registries
from jarvis.settings import JarvisSettings

log = logging.getLogger("jarvis.supervisor")

State = Literal["loading", "ready", "restarting", "failed", "stopped"]
#: Seconds between engine health checks, and the waits between restart attempts.
HEALTH_CHECK_INTERVAL = 2.0
RESTART_BACKOFF = (1.0, 5.0, 15.0)
#: Waits between attempts to start an engine that failed its first start (JARVIS_ENGINE_START_RETRY);
#: the last one repeats.
START_RETRY_BACKOFF = (1.0, 5.0, 15.0, 30.0, 60.0)


class EngineSupervisor:
    def __init__(self, settings: JarvisSettings, registries: Registries, *,
                 on_started: Callable[[], Awaitable[None]],
                 on_restarted: Callable[[Engine], Awaitable[None]]) -> None:
        """`on_started` runs once the first start loaded the model, before "ready"; `on_restarted(engine)`
        after a restart replaced the engine, before "ready" again."""
        self.settings = settings
        self.registries = registries
        self._on_started = on_started
        self._on_restarted = on_restarted
        self.engine: Engine = self._new_engine()
        self.state: State = "loading"
        self.failure: str | None = None
        self.info: ModelInfo | None = None
        self.restarts = 0
        self.start_attempts = 1
        self.next_start_attempt: float | None = None  # epoch seconds, while a failed start waits for a retry
        self._watchdog: asyncio.Task | None = None

    def _new_engine(self) -> Engine:
        return self.registries.engines.get(self.settings.inference_engine)(self.settings)

    async def serve(self, on_fatal: Callable[[str], None] | None = None) -> None:
        """Start the engine. When it fails: call `on_fatal(reason)` (the server exits non-zero), or with
        JARVIS_ENGINE_START_RETRY stay up, failed and answering 503, and try again with back-off."""
        attempt = 0
        while True:
            try:
                await self.start()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if not self.settings.engine_start_retry:
                    if on_fatal is not None:
                        on_fatal(self.failure or "the engine failed to start")
                    return
            wait = START_RETRY_BACKOFF[min(attempt, len(START_RETRY_BACKOFF) - 1)]
            attempt += 1
            log.warning("engine %s start %d failed; retrying in %.0f s (JARVIS_ENGINE_START_RETRY)",
                        self.engine.name, attempt, wait)
            self.next_start_attempt = time.time() + wait
            await asyncio.sleep(wait)
            try:
                await self.engine.stop()
            except Exception as exc:  # a half-started engine may not stop cleanly
                log.warning("stopping the engine that failed to start: %s", exc)
            self.engine = self._new_engine()
            self.start_attempts = attempt + 1

    async def start(self) -> None:
        try:
            await self.engine.start()
            self.info = self.engine.model_info()
        except ConfigError as exc:
            self._fail(str(exc))
            raise
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise
        await self._on_started()  # before "ready": a restarted server answers for its adapters at once
        # What the engine's start left on the heap (torch, vLLM, the model's modules) lives as long as the
        # server: moved out of the collector's reach, as `vllm serve` does, a full collection no longer walks
        # it in the middle of a stream
        gc.collect()
        gc.freeze()
        self.state, self.failure, self.next_start_attempt = "ready", None, None
        log.info("engine %s ready: model %s (context %d tokens)", self.engine.name, self.info.id,
                 self.info.max_model_len)
        self._watchdog = asyncio.create_task(self._watch(), name="engine-watchdog")

    async def _watch(self) -> None:
        """Restart the engine when it reports itself dead (e.g. vLLM's engine process was killed)."""
        while self.state in ("ready", "restarting"):
            await asyncio.sleep(HEALTH_CHECK_INTERVAL)
            problem = self.engine.health_problem() if self.state == "ready" else None
            if problem is None:
                continue
            self.state, self.failure = "restarting", problem
            log.error("engine %s failed while serving (%s); restarting it", self.engine.name, problem)
            for attempt, wait in enumerate(RESTART_BACKOFF, 1):
                try:
                    await self._restart()
                    break
                except Exception as exc:
                    self.failure = f"{problem}; restart {attempt} failed: {type(exc).__name__}: {exc}"
                    log.error("engine restart %d failed: %s", attempt, exc)
                    await asyncio.sleep(wait)
            else:
                self._fail(self.failure or problem)

    async def _restart(self) -> None:
        try:
            await self.engine.stop()
        except Exception as exc:  # the dead engine may not stop cleanly
            log.warning("stopping the failed engine: %s", exc)
        self.engine = self._new_engine()
        await self.engine.start()
        self.info = self.engine.model_info()
        await self._on_restarted(self.engine)
        self.restarts += 1
        self.state, self.failure = "ready", None
        log.info("engine %s restarted (%d so far)", self.engine.name, self.restarts)

    def _fail(self, message: str) -> None:
        self.state, self.failure = "failed", message
        log.error("engine %s failed to start: %s", self.engine.name, message)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self.state != "stopped":
            self.state = "stopped"
            await self.engine.stop()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def require_ready(self) -> ModelInfo:
        """The model's info while the engine serves; otherwise the 503 that says why not."""
        if self.state == "ready" and self.info is not None:
            return self.info
        if self.state == "loading":
            raise EngineUnavailable("The model is still loading; retry in a few seconds.",
                                    code="engine_loading")
        if self.state == "restarting":
            raise EngineUnavailable(f"The engine failed ({self.failure}) and is restarting; retry shortly.",
                                    code="engine_restarting")
        raise EngineUnavailable(f"The engine is not available: {self.failure or self.state}.",
                                code="engine_unavailable")
