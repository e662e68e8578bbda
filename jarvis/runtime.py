"""The serving runtime: the path from a request to the engine.

The serving layer (`jarvis.serving`) asks it to admit a client (a 429 when the server is full or the client
used up its minute, a 503 while the engine cannot serve), hands it a `GenerationRequest` to `prepare`
(`jarvis.prepare`: model resolved, chat rendered, constraint compiled, context checked) and runs the
`PreparedRequest` through `generate` or `stream`: the request hooks fire around it, and one wrapper counts
every engine call and reads tool calls out of the output, for every engine alike. It knows no engine by name
and no route; its errors are `APIError`s that carry their status. The engine's lifecycle is
`jarvis.supervisor`'s, the served adapters are `jarvis.adapters`'s. `Runtime` is what the serving layer and
plugins may rely on.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from jarvis.adapters import AdapterInfo, AdapterService
from jarvis.chat_format import ChatFormat
from jarvis.embeddings import as_hooked_request, as_hooked_result, prepare_embeddings
from jarvis.engine import (
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    PreparedRequest,
    StreamResult,
    ToolCallReader,
    finish_with_calls,
    whole_calls,
)
from jarvis.errors import APIError, EngineFailure, NotFound
from jarvis.hook_relay import HookRelay
from jarvis.limits import Admission, ClientRateLimiter
from jarvis.prepare import ServedModel, Target, prepare
from jarvis.registry import Registries
from jarvis.settings import JarvisSettings
from jarvis.supervisor import EngineSupervisor, State

log = logging.getLogger("jarvis.runtime")


class Runtime(Protocol):
    """What the serving layer (`jarvis.serving`), the routes and plugins use of the runtime."""

    settings: JarvisSettings

    @property
    def engine(self) -> Engine: ...
    @property
    def model_id(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    @property
    def adapters(self) -> dict[str, AdapterInfo]: ...
    @property
    def queue_depth(self) -> int: ...
    def health(self) -> dict[str, Any]: ...
    def require_ready(self) -> ModelInfo: ...
    def models(self) -> list[ServedModel]: ...
    def resolve_model(self, name: str) -> ServedModel: ...
    def chat_format(self, model_id: str) -> ChatFormat: ...
    def admit(self, client: str) -> None: ...
    def prepare(self, request: GenerationRequest) -> PreparedRequest: ...
    async def off_loop(self, size: int, build: Callable[..., T], *args: Any) -> T: ...
    async def load_adapter(self, name: str, path: str, *, persist: bool = True,
                           private: bool = False, owner: str | None = None) -> AdapterInfo: ...
    async def unload_adapter(self, name: str) -> None: ...
    async def generate(self, request: PreparedRequest) -> GenerationResult: ...
    def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]: ...
    def prepare_embeddings(self, request: EmbeddingRequest) -> EmbeddingRequest: ...
    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...


T = TypeVar("T")

#: A request body at least this large is prepared (chat rendered, prompt tokenized) on a worker thread when the
#: engine's tokenizer releases the GIL. Tokenizing runs about 0.3 ms per KiB of text (Gemma's tokenizer on a
#: 2-core CI-class machine; on the GPU host a 256-token prompt took 1.8 ms, 17 % of the API process at 64
#: streams), and on the event loop every running stream waits that long for its next chunk. At 1 KiB the hop
#: to the thread costs about what it saves (bench/prepare_stall.py).
PREPARE_OFF_LOOP_BYTES = 1024


class EngineRuntime:
    """Requests in, engine calls out. The engine's lifecycle is the supervisor's (`jarvis.supervisor`),
    the served adapters the adapter service's (`jarvis.adapters`); the runtime delegates to both."""

    def __init__(self, settings: JarvisSettings, registries: Registries, hooks: HookRelay) -> None:
        self.settings = settings
        self.registries = registries
        self.hooks = hooks
        self.started_at = int(time.time())
        self.supervisor = EngineSupervisor(settings, registries, on_started=self._restore_adapters,
                                           on_restarted=self._reload_adapters)
        self.adapter_service = AdapterService(settings, lambda: self.engine, lambda: self.model_id)
        self._formats: dict[str, ChatFormat] = {}
        #: Generations between the request hooks (handed to the engine, not yet finished).
        self.in_flight = 0
        self.admission = Admission(settings.max_concurrent, settings.max_queue)
        self.rate_limiter = ClientRateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        self._preparer: ThreadPoolExecutor | None = None

    # --- lifecycle (the supervisor's) ------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self.supervisor.engine

    @property
    def state(self) -> State:
        return self.supervisor.state

    @property
    def failure(self) -> str | None:
        return self.supervisor.failure

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def start_attempts(self) -> int:
        return self.supervisor.start_attempts

    @property
    def next_start_attempt(self) -> float | None:
        return self.supervisor.next_start_attempt

    @property
    def ready(self) -> bool:
        return self.supervisor.ready

    def require_ready(self) -> ModelInfo:
        return self.supervisor.require_ready()

    async def serve_engine(self, on_fatal: Callable[[str], None] | None = None) -> None:
        await self.supervisor.serve(on_fatal)

    async def start(self) -> None:
        await self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()
        if self._preparer is not None:
            self._preparer.shutdown(wait=False)
            self._preparer = None

    async def _restore_adapters(self) -> None:
        await self.adapter_service.restore()
        log.info("%d adapter(s) served", len(self.adapters))

    async def _reload_adapters(self, engine: Engine) -> None:
        self._formats.clear()  # the new engine's model info
        await self.adapter_service.reload_into(engine)

    def health(self) -> dict[str, Any]:
        """What `/health` reports: the engine's state and why, the request and token counters."""
        stats = self.engine.stats
        return {
            "status": self.state,
            "engine": self.settings.inference_engine,
            "model": self.model_id if self.ready else None,
            "error": self.failure,
            "requests_in_flight": stats.in_flight,
            "requests_waiting": self.admission.waiting,
            "requests_total": stats.requests_started,
            "requests_cancelled": stats.requests_cancelled,
            "tokens_generated": stats.tokens_generated,
            "forward_passes": stats.forward_passes,
            "engine_restarts": self.restarts,
            "start_attempts": self.start_attempts,
            "next_start_attempt": self.next_start_attempt,
        }

    # --- models ------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        info = self.supervisor.info
        return self.settings.served_model_name or (info.id if info else self.settings.inference_engine)

    def models(self) -> list[ServedModel]:
        return self._models(self.require_ready())

    def _models(self, info: ModelInfo, private: bool = False) -> list[ServedModel]:
        """The base and the adapters served (a service's private ones too when `private`)."""
        base = ServedModel(self.model_id, self.started_at, info.max_model_len, info.owned_by)
        adapters = [ServedModel(name, a.loaded_at, info.max_model_len, info.owned_by, adapter=name)
                    for name, a in self.adapters.items() if private or not a.private]
        return [base, *adapters]

    def resolve_model(self, name: str) -> ServedModel:
        return self._served(self.require_ready(), name)

    def _served(self, info: ModelInfo, name: str, client: str | None = None) -> ServedModel:
        for model in self._models(info, private=True):  # a private adapter: to its owner, or whoever names it
            if model.id == name and self._serves(model, client):
                return model
        listed = ", ".join(m.id for m in self._models(info))
        raise NotFound(f"The model `{name}` does not exist. Available: {listed}.", param="model",
                       code="model_not_found")

    def _serves(self, model: ServedModel, client: str | None) -> bool:
        adapter = self.adapters.get(model.adapter) if model.adapter is not None else None
        return adapter is None or adapter.owner is None or adapter.owner == client

    @property
    def queue_depth(self) -> int:
        """Generations waiting for a slot: the server's (JARVIS_MAX_CONCURRENT) and the engine's."""
        return max(0, self.in_flight - self.engine.stats.in_flight) + self.engine.waiting

    def chat_format(self, model_id: str) -> ChatFormat:
        return self._chat_format(model_id, self.require_ready())

    def _chat_format(self, model_id: str, info: ModelInfo) -> ChatFormat:
        if model_id not in self._formats:
            name = self.settings.chat_formats.get(model_id, self.settings.chat_format)
            self._formats[model_id] = self.registries.chat_formats.get(name)(info)
        return self._formats[model_id]

    # --- adapters (the adapter service's) ------------------------------------------------------

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return self.adapter_service.served

    async def load_adapter(self, name: str, path: str, *, persist: bool = True,
                           private: bool = False, owner: str | None = None) -> AdapterInfo:
        """Serve the adapter folder at `path` as `name`; a `private` one is unlisted and, with an `owner`,
        served to that client's requests only."""
        if self.supervisor.info is None:  # the model must be loaded; adapters restored at start come before "ready"
            self.require_ready()
        return await self.adapter_service.load(name, path, persist=persist, private=private, owner=owner)

    async def unload_adapter(self, name: str) -> None:
        self.require_ready()
        await self.adapter_service.unload(name)

    # --- requests ----------------------------------------------------------------------------

    def admit(self, client: str) -> None:
        """An HTTP request may start: raise 429 if the server is full or `client` used up its minute."""
        self.require_ready()
        self.admission.check()
        self.rate_limiter.admit(client)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """The request as the engine takes it (`jarvis.prepare`), for the model it names; the request's
        context learns which engine serves it."""
        info = self.require_ready()
        served = self._served(info, request.model, request.context.client)
        engine = self.engine
        request.context.engine = engine.name
        needs_format = request.kind == "chat" and not engine.applies_chat_template
        return prepare(request, Target(engine, info, served,
                                       self._chat_format(served.id, info) if needs_format else None,
                                       self.settings.max_tokens_cap))

    async def off_loop(self, size: int, build: Callable[..., T], *args: Any) -> T:
        """`build(*args)`: a request's preparation (`prepare` under it), on the runtime's one preparing thread
        when the body is `size` bytes, at least PREPARE_OFF_LOOP_BYTES, and the engine tokenizes without
        holding the GIL, so the event loop goes on sending the running streams' chunks meanwhile; inline
        otherwise. One thread, not asyncio's pool: threads preparing side by side take the GIL from the loop
        in turn for their Python parts, and `bench/prepare_stall.py` measured the loop's p99 lateness at
        100 long prompts a second 1.07x inline with the pool and 0.45x with one thread (512 tokens)."""
        if size >= PREPARE_OFF_LOOP_BYTES and self.engine.tokenizer_releases_gil:
            if self._preparer is None:
                self._preparer = ThreadPoolExecutor(1, thread_name_prefix="jarvis-prepare")
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(self._preparer, context.run, build, *args)
        return build(*args)

    async def generate(self, request: PreparedRequest) -> GenerationResult:
        self._started(request)
        try:
            async with self.admission.slot():
                result = await self._engine_generate(request)
        except BaseException as exc:
            self._finished(request, None, exc)
            raise _as_api_error(exc)  # noqa: B904  (the error it returns carries its cause)
        self._finished(request, result, None)
        return result

    async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        """The engine's chunks; the finished hook gets the stream's result (None when it did not finish)."""
        self._started(request)
        error: BaseException | None = None
        collected = StreamResult()
        try:
            async with self.admission.slot():
                async for chunk in self._engine_stream(request):
                    collected.add(chunk)
                    yield chunk
        except BaseException as exc:
            error = exc
            raise _as_api_error(exc)  # noqa: B904  (the error it returns carries its cause)
        finally:
            self._finished(request, collected.result() if error is None else None, error)

    def prepare_embeddings(self, request: EmbeddingRequest) -> EmbeddingRequest:
        """The embeddings request as the engine takes it (`jarvis.embeddings`): checked, tokenized."""
        info = self.require_ready()
        request.context.engine = self.engine.name
        return prepare_embeddings(request, self.engine, info, self._served(info, request.model))

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """The vectors of a prepared embeddings request, in a generation slot, the request hooks around it."""
        hooked = as_hooked_request(request)
        self._started(hooked)
        stats = self.engine.stats
        try:
            async with self.admission.slot():
                stats.requests_started += 1
                try:
                    result = await self.engine.embed(request)
                finally:
                    stats.requests_finished += 1
        except BaseException as exc:
            self._finished(hooked, None, exc)
            raise _as_api_error(exc)  # noqa: B904  (the error it returns carries its cause)
        self._finished(hooked, as_hooked_result(result), None)
        return result

    # Every engine call passes through one of these two, once: the engine's request counters, the tokens
    # it generated and the first token's arrival are kept here, not by each engine.

    async def _engine_generate(self, request: PreparedRequest) -> GenerationResult:
        stats = self.engine.stats
        stats.requests_started += 1
        result = None
        try:
            result = await self.engine.generate(request)
            stats.tokens_generated += result.completion_tokens
            if request.tool_reader is not None:
                result = _calls_of_result(request.tool_reader(), result)
            return result
        finally:
            stats.requests_finished += 1
            stats.requests_cancelled += result is None

    async def _engine_stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        stats = self.engine.stats
        stats.requests_started += 1
        counted, finished = 0, False
        parser = request.tool_reader() if request.tool_reader is not None else None
        calls = 0
        try:
            async for chunk in self.engine.stream(request):
                request.mark_first_token(chunk)
                counted += chunk.token_count
                stats.tokens_generated += chunk.token_count
                if chunk.finish_reason is not None:
                    finished = True  # the final count is the engine's (tokens held back by a stop matcher too)
                    if chunk.completion_tokens is not None:
                        stats.tokens_generated += chunk.completion_tokens - counted
                if parser is not None:  # the text becomes content and tool-call pieces
                    chunk.text, chunk.tool_calls = parser.feed(chunk.text)
                    if chunk.finish_reason is not None:
                        rest, more = parser.finish()
                        chunk.text, chunk.tool_calls = chunk.text + rest, [*chunk.tool_calls, *more]
                    calls += sum(d.id is not None for d in chunk.tool_calls)
                    if chunk.finish_reason is not None:
                        chunk.finish_reason = finish_with_calls(chunk.finish_reason, calls > 0)
                    if not (chunk.text or chunk.tool_calls or chunk.logprobs or chunk.finish_reason):
                        continue
                yield chunk
        finally:
            stats.requests_finished += 1
            stats.requests_cancelled += not finished

    def _started(self, request: PreparedRequest) -> None:
        self.in_flight += 1
        self.hooks.call("jarvis_request_started", request=request)

    def _finished(self, request: PreparedRequest, result: GenerationResult | None,
                  error: BaseException | None) -> None:
        self.in_flight -= 1
        if result is not None:
            self.rate_limiter.record(request.client, result.prompt_tokens + result.completion_tokens)
        self.hooks.call("jarvis_request_finished", request=request, result=result, error=error)


def _calls_of_result(parser: ToolCallReader, result: GenerationResult) -> GenerationResult:
    """A whole output read by a tool-call parser: the content outside the calls, and the calls."""
    text, deltas = parser.feed(result.text)
    rest, more = parser.finish()
    calls = whole_calls([*deltas, *more])
    if result.finish_reason == "length":  # the last call may be cut off: a client could not send it back
        calls = [c for c in calls if _is_json(c.arguments)]
    return replace(result, text=text + rest, tool_calls=calls,
                   finish_reason=finish_with_calls(result.finish_reason, bool(calls)))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _as_api_error(exc: BaseException) -> BaseException:
    """An engine's exception as the client will see it; cancellation and API errors pass as they are."""
    if isinstance(exc, (APIError, asyncio.CancelledError, GeneratorExit)):
        return exc
    log.error("generation failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    failure = EngineFailure(f"The engine failed while generating: {type(exc).__name__}: {exc}",
                            code="engine_error")
    failure.__cause__ = exc
    return failure
