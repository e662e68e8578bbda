"""The serving runtime: one engine, its lifecycle, and the path from request to engine.

Routes hand it wire-level intent (a prompt or chat messages plus sampling
options); it resolves the model id, renders chat through the selected chat
format, checks the context window, fires the request hooks and calls the
engine. It knows no engine by name and nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from jarvis.adapters import AdapterInfo, AdapterStore, InvalidAdapter, inspect_adapter
from jarvis.chat_format import ChatFormat, ChatFormatError
from jarvis.engine import Engine, GenerationChunk, GenerationRequest, GenerationResult, ModelInfo
from jarvis.errors import (APIError, ConfigError, ContextLengthExceeded, EngineFailure,
                           EngineUnavailable, InvalidRequest, NotFound)
from jarvis.limits import Admission, ClientRateLimiter
from jarvis.registry import Registries
from jarvis.settings import JarvisSettings

log = logging.getLogger("jarvis.runtime")

State = Literal["loading", "ready", "restarting", "failed", "stopped"]
#: Seconds between engine health checks, and the waits between restart attempts.
HEALTH_CHECK_INTERVAL = 2.0
RESTART_BACKOFF = (1.0, 5.0, 15.0)
#: Waits between attempts to start an engine that failed its first start (JARVIS_ENGINE_START_RETRY);
#: the last one repeats.
START_RETRY_BACKOFF = (1.0, 5.0, 15.0, 30.0, 60.0)


@dataclass(frozen=True)
class ServedModel:
    id: str
    created: int
    max_model_len: int
    owned_by: str
    adapter: str | None = None


class EngineRuntime:
    def __init__(self, settings: JarvisSettings, registries: Registries, hooks: Any) -> None:
        self.settings = settings
        self.registries = registries
        self.hooks = hooks
        self.engine: Engine = registries.engines.get(settings.inference_engine)(settings)
        self.state: State = "loading"
        self.failure: str | None = None
        self.started_at = int(time.time())
        self._info: ModelInfo | None = None
        self._formats: dict[str, ChatFormat] = {}
        self.adapters: dict[str, AdapterInfo] = {}
        self._unrestored: dict[str, str] = {}  # registered adapters that failed to load at this start
        self._store = AdapterStore(settings.state_path / "adapters.json")
        self._adapter_lock = asyncio.Lock()
        #: Generations between the request hooks (handed to the engine, not yet finished).
        self.in_flight = 0
        self.restarts = 0
        self.start_attempts = 1
        self.next_start_attempt: float | None = None  # epoch seconds, while a failed start waits for a retry
        self._watchdog: asyncio.Task | None = None
        self.admission = Admission(settings.max_concurrent, settings.max_queue)
        self.rate_limiter = ClientRateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)

    # --- lifecycle -------------------------------------------------------------------------

    async def serve_engine(self, on_fatal: Any = None) -> None:
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
            self.engine = self.registries.engines.get(self.settings.inference_engine)(self.settings)
            self.start_attempts = attempt + 1

    async def start(self) -> None:
        try:
            await self.engine.start()
            self._info = self.engine.model_info()
        except ConfigError as exc:
            self._fail(str(exc))
            raise
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise
        await self._restore_adapters()  # before "ready": a restarted server answers for them at once
        self.state, self.failure, self.next_start_attempt = "ready", None, None
        log.info("engine %s ready: model %s (context %d tokens, %d adapters)", self.engine.name,
                 self.model_id, self._info.max_model_len, len(self.adapters))
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
                    await self._restart_engine()
                    break
                except Exception as exc:
                    self.failure = f"{problem}; restart {attempt} failed: {type(exc).__name__}: {exc}"
                    log.error("engine restart %d failed: %s", attempt, exc)
                    await asyncio.sleep(wait)
            else:
                self._fail(self.failure or problem)

    async def _restart_engine(self) -> None:
        try:
            await self.engine.stop()
        except Exception as exc:  # the dead engine may not stop cleanly
            log.warning("stopping the failed engine: %s", exc)
        self.engine = self.registries.engines.get(self.settings.inference_engine)(self.settings)
        await self.engine.start()
        self._info = self.engine.model_info()
        for adapter in list(self.adapters.values()):  # serve the same adapters again
            try:
                await self.engine.load_adapter(adapter)
            except Exception as exc:
                log.error("adapter %s not reloaded after the restart: %s", adapter.name, exc)
                del self.adapters[adapter.name]
                self._unrestored[adapter.name] = adapter.path
        self.restarts += 1
        self.state, self.failure = "ready", None
        log.info("engine %s restarted (%d so far)", self.engine.name, self.restarts)

    async def _restore_adapters(self) -> None:
        """Serve again what was served before a restart, plus JARVIS_LORA_MODULES."""
        stored = self._store.load()
        for name, path in {**stored, **self.settings.lora_modules}.items():
            try:
                await self.load_adapter(name, path, persist=False)
            except Exception as exc:  # one bad adapter must not take the server down
                log.error("adapter %s (%s) not loaded: %s", name, path, exc)
                if name in stored:  # keep it registered: a missing disk or file may come back
                    self._unrestored[name] = stored[name]
        self._persist()

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
        if self.state == "ready" and self._info is not None:
            return self._info
        if self.state == "loading":
            raise EngineUnavailable("The model is still loading; retry in a few seconds.",
                                    code="engine_loading")
        if self.state == "restarting":
            raise EngineUnavailable(f"The engine failed ({self.failure}) and is restarting; retry shortly.",
                                    code="engine_restarting")
        raise EngineUnavailable(f"The engine is not available: {self.failure or self.state}.",
                                code="engine_unavailable")

    # --- models ------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        info = self._info
        return self.settings.served_model_name or (info.id if info else self.settings.inference_engine)

    def models(self) -> list[ServedModel]:
        info = self.require_ready()
        base = ServedModel(self.model_id, self.started_at, info.max_model_len, info.owned_by)
        adapters = [ServedModel(name, a.loaded_at, info.max_model_len, info.owned_by, adapter=name)
                    for name, a in self.adapters.items()]
        return [base, *adapters]

    def resolve_model(self, name: str) -> ServedModel:
        for model in self.models():
            if model.id == name:
                return model
        raise NotFound(f"The model `{name}` does not exist. Available: "
                       f"{', '.join(m.id for m in self.models())}.", param="model",
                       code="model_not_found")

    @property
    def queue_depth(self) -> int:
        """Generations handed to the engine that it has not begun decoding (waiting for a slot)."""
        return max(0, self.in_flight - self.engine.stats.in_flight)

    def chat_format(self, model_id: str) -> ChatFormat:
        if model_id not in self._formats:
            name = self.settings.chat_formats.get(model_id, self.settings.chat_format)
            self._formats[model_id] = self.registries.chat_formats.get(name)(self.require_ready())
        return self._formats[model_id]

    # --- adapters ----------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str, *, persist: bool = True) -> AdapterInfo:
        if self._info is None:  # the model must be loaded; adapters restored at start come before "ready"
            self.require_ready()
        if not name or name == self.model_id:
            raise InvalidRequest(f"lora_name {name!r} is empty or names the base model", param="lora_name")
        async with self._adapter_lock:
            if name in self.adapters:
                raise InvalidRequest(f"The lora adapter '{name}' has already been loaded; unload it first.",
                                     param="lora_name", code="adapter_exists")
            adapter = inspect_adapter(name, path, self.settings.adapter_dir, self.settings.max_lora_rank)
            try:
                await self.engine.load_adapter(adapter)
            except NotImplementedError as exc:
                raise InvalidRequest(str(exc), code="adapters_not_supported") from None
            except APIError:
                raise
            except Exception as exc:
                raise InvalidAdapter(f"the {self.engine.name} engine could not load adapter {name!r}: "
                                     f"{type(exc).__name__}: {exc}", code="adapter_load_failed") from exc
            self.adapters[name] = adapter
            self._unrestored.pop(name, None)
            if persist:
                self._persist()
        log.info("adapter %s loaded from %s (rank %d)", name, adapter.path, adapter.rank)
        return adapter

    async def unload_adapter(self, name: str) -> None:
        self.require_ready()
        async with self._adapter_lock:
            if self._unrestored.pop(name, None) is not None and name not in self.adapters:
                self._persist()  # unregistering one that could not be restored
                return
            if name not in self.adapters:
                raise NotFound(f"The lora adapter '{name}' is not loaded.", param="lora_name",
                               code="adapter_not_found")
            await self.engine.unload_adapter(name)
            del self.adapters[name]
            self._persist()

    def _persist(self) -> None:
        self._store.save({**self._unrestored, **{name: a.path for name, a in self.adapters.items()}})

    # --- requests ----------------------------------------------------------------------------

    def admit(self, client: str) -> None:
        """An HTTP request may start: raise 429 if the server is full or `client` used up its minute."""
        self.require_ready()
        self.admission.check()
        self.rate_limiter.admit(client)

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Resolve the model, render chat, tokenize, and check the context window."""
        info = self.require_ready()
        served = self.resolve_model(request.model)
        request.adapter = served.adapter
        request.engine = self.engine.name
        self._check_supported(request)
        if request.kind == "chat" and not self.engine.applies_chat_template:
            fmt = self.chat_format(served.id)
            try:
                request.prompt = fmt(request.messages or [], True)
            except ChatFormatError as exc:
                raise InvalidRequest(f"cannot render the conversation with chat format "
                                     f"{fmt.name!r}: {exc}", param="messages") from None
            request.stop = [*request.stop, *(s for s in fmt.stop if s not in request.stop)]
        cap = self.settings.max_tokens_cap
        if cap is not None and request.max_tokens is not None and request.max_tokens > cap:
            raise InvalidRequest(f"max_tokens is {request.max_tokens}, above this server's limit of {cap} "
                                 f"(JARVIS_MAX_TOKENS_CAP).", param="max_tokens", code="max_tokens_too_large")
        if request.prompt_token_ids is not None and request.prompt is None:  # the client sent token ids
            request.score_bos = True
            bad = [t for t in request.prompt_token_ids if info.vocab_size is not None and not 0 <= t < info.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt holds token ids outside this model's vocabulary (0..{info.vocab_size - 1}): "
                                     f"{bad[:5]}", param="prompt", code="invalid_token_id")
            if self.engine.counts_tokens:
                request.prompt = self.engine.detokenize(request.prompt_token_ids)  # for echo
        elif request.prompt is not None and self.brings_bos(request.prompt):
            request.score_bos = True  # the text brings its own <bos>: never a second one
        if (request.prompt is not None or request.prompt_token_ids is not None) and self.engine.counts_tokens:
            if request.prompt_token_ids is None:
                request.prompt_token_ids = self.engine.tokenize(request.prompt or "",
                                                                add_special=not request.score_bos)
            ids = request.prompt_token_ids
            budget = info.max_model_len - len(ids)
            if request.max_tokens is None:
                if budget < 1:
                    raise ContextLengthExceeded(len(ids), 1, info.max_model_len)
                request.max_tokens = min(budget, cap or budget)
            elif request.max_tokens > budget:
                raise ContextLengthExceeded(len(ids), request.max_tokens, info.max_model_len)
        if request.max_tokens is None and cap is not None:  # an engine that counts remotely
            request.max_tokens = cap
        return request

    def brings_bos(self, text: str) -> bool:
        """The text begins with the model's <bos>: tokenize it without adding another."""
        bos = self.require_ready().bos_token
        return bool(bos) and text.startswith(bos)

    def _check_supported(self, request: GenerationRequest) -> None:
        """Refuse what the engine cannot honour (a 400 naming the field), and compile the output constraint."""
        asked = {"top_k": request.top_k not in (0, -1), "min_p": request.min_p > 0,
                 "repetition_penalty": request.repetition_penalty != 1.0, "logit_bias": bool(request.logit_bias)}
        for feature, used in asked.items():
            if used and feature not in self.engine.supports:
                raise InvalidRequest(f"`{feature}` is not supported by the {self.engine.name} engine; omit it or "
                                     f"serve with an engine that has it.", param=feature, code="unsupported_parameter")
        constraint = request.constraint
        if constraint is None:
            return
        if constraint.kind not in self.engine.supports:
            raise InvalidRequest(f"{constraint.param}: constrained decoding to {constraint.kind.replace('_', ' ')} is "
                                 f"not supported by the {self.engine.name} engine.", param=constraint.param,
                                 code="unsupported_parameter")
        try:
            request.compiled_constraint = self.engine.compile_constraint(constraint)
        except ValueError as exc:
            raise InvalidRequest(f"{constraint.param}: the {self.engine.name} engine cannot compile this "
                                 f"{constraint.kind.replace('_', ' ')}: {exc}", param=constraint.param,
                                 code="invalid_response_format") from None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._started(request)
        try:
            async with self.admission.slot():
                result = await self.engine.generate(request)
        except BaseException as exc:
            self._finished(request, None, exc)
            raise _as_api_error(exc)
        self._finished(request, result, None)
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The engine's chunks; the finished hook gets the text and usage (no logprobs) of the stream."""
        self._started(request)
        error: BaseException | None = None
        parts: list[str] = []
        last: GenerationChunk | None = None
        try:
            async with self.admission.slot():
                async for chunk in self.engine.stream(request):
                    request.mark_first_token(chunk)
                    parts.append(chunk.text)
                    last = chunk
                    yield chunk
        except BaseException as exc:
            error = exc
            raise _as_api_error(exc)
        finally:
            result = None
            if error is None and last is not None and last.finish_reason is not None:
                result = GenerationResult("".join(parts), last.finish_reason, last.prompt_tokens or 0,
                                          last.completion_tokens or 0)
            self._finished(request, result, error)

    def _started(self, request: GenerationRequest) -> None:
        self.in_flight += 1
        try:
            self.hooks.jarvis_request_started(request=request)
        except Exception:
            log.exception("a jarvis_request_started hook raised; ignored")

    def _finished(self, request: GenerationRequest, result: GenerationResult | None,
                  error: BaseException | None) -> None:
        self.in_flight -= 1
        if result is not None:
            self.rate_limiter.record(request.client, result.prompt_tokens + result.completion_tokens)
        try:
            self.hooks.jarvis_request_finished(request=request, result=result, error=error)
        except Exception:
            log.exception("a jarvis_request_finished hook raised; ignored")


def _as_api_error(exc: BaseException) -> BaseException:
    """An engine's exception as the client will see it; cancellation and API errors pass as they are."""
    if isinstance(exc, (APIError, asyncio.CancelledError, GeneratorExit)):
        return exc
    log.error("generation failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    failure = EngineFailure(f"The engine failed while generating: {type(exc).__name__}: {exc}",
                            code="engine_error")
    failure.__cause__ = exc
    return failure
