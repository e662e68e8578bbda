"""The serving runtime: the path from a request to the engine.

The serving layer (`jarvis.serving`) hands it a `GenerationRequest`; it admits
it, resolves the model id, renders chat through the selected chat format,
checks what the engine supports and compiles the output constraint, checks the
context window, fires the request hooks and calls the engine, counting every
engine call the same way. It knows no engine by name and nothing about HTTP.
The engine's lifecycle is `jarvis.supervisor`'s, the served adapters are
`jarvis.adapters`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from jarvis.adapters import AdapterInfo, AdapterService
from jarvis.chat_format import ChatFormat, ChatFormatError
from jarvis.engine import (
    Engine,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    OutputConstraint,
    ToolCallDelta,
    whole_calls,
)
from jarvis.errors import APIError, ContextLengthExceeded, EngineFailure, InvalidRequest, NotFound
from jarvis.limits import Admission, ClientRateLimiter
from jarvis.registry import Registries
from jarvis.settings import JarvisSettings
from jarvis.supervisor import EngineSupervisor, State
from jarvis.tool_calls import call_schema, convention_messages, parser_for, template_messages, uses_tools

log = logging.getLogger("jarvis.runtime")


@dataclass(frozen=True)
class ServedModel:
    id: str
    created: int
    max_model_len: int
    owned_by: str
    adapter: str | None = None


class EngineRuntime:
    """Requests in, engine calls out. The engine's lifecycle is the supervisor's (`jarvis.supervisor`),
    the served adapters the adapter service's (`jarvis.adapters`); the runtime delegates to both."""

    def __init__(self, settings: JarvisSettings, registries: Registries, hooks: Any) -> None:
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

    async def serve_engine(self, on_fatal: Any = None) -> None:
        await self.supervisor.serve(on_fatal)

    async def start(self) -> None:
        await self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()

    async def _restore_adapters(self) -> None:
        await self.adapter_service.restore()
        log.info("%d adapter(s) served", len(self.adapters))

    async def _reload_adapters(self, engine: Engine) -> None:
        self._formats.clear()  # the new engine's model info
        await self.adapter_service.reload_into(engine)

    # --- models ------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        info = self.supervisor.info
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
        """Generations waiting for a slot: the server's (JARVIS_MAX_CONCURRENT) and the engine's."""
        return max(0, self.in_flight - self.engine.stats.in_flight) + self.engine.waiting

    def chat_format(self, model_id: str) -> ChatFormat:
        if model_id not in self._formats:
            name = self.settings.chat_formats.get(model_id, self.settings.chat_format)
            self._formats[model_id] = self.registries.chat_formats.get(name)(self.require_ready())
        return self._formats[model_id]

    # --- adapters (the adapter service's) ------------------------------------------------------

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return self.adapter_service.served

    async def load_adapter(self, name: str, path: str, *, persist: bool = True) -> AdapterInfo:
        if self.supervisor.info is None:  # the model must be loaded; adapters restored at start come before "ready"
            self.require_ready()
        return await self.adapter_service.load(name, path, persist=persist)

    async def unload_adapter(self, name: str) -> None:
        self.require_ready()
        await self.adapter_service.unload(name)

    # --- requests ----------------------------------------------------------------------------

    def admit(self, client: str) -> None:
        """An HTTP request may start: raise 429 if the server is full or `client` used up its minute."""
        self.require_ready()
        self.admission.check()
        self.rate_limiter.admit(client)

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request as the engine takes it, a new one: model resolved, chat rendered, what the engine
        cannot honour refused, the output constraint compiled, the prompt tokenized and the context window
        and max_tokens checked. The request's context learns which engine serves it."""
        info = self.require_ready()
        served = self.resolve_model(request.model)
        request.context.engine = self.engine.name
        request = self._with_call_constraint(request)
        compiled = self._check_supported(request)
        prompt, stop, ids, score_bos = request.prompt, tuple(request.stop), request.prompt_token_ids, request.score_bos
        parser = None
        if request.kind == "chat" and not self.engine.applies_chat_template:
            fmt = self.chat_format(served.id)
            try:
                prompt = self._render_chat(fmt, request)
            except ChatFormatError as exc:
                raise InvalidRequest(f"cannot render the conversation with chat format "
                                     f"{fmt.name!r}: {exc}", param="messages") from None
            stop = (*stop, *(s for s in fmt.stop if s not in stop))
            tool_use = request.tool_use
            if tool_use is not None and tool_use.offered:
                parser = parser_for(tool_use, fmt.tool_parser if fmt.tool_prompt else None)
        cap = self.settings.max_tokens_cap
        max_tokens = request.max_tokens
        if cap is not None and max_tokens is not None and max_tokens > cap:
            raise InvalidRequest(f"max_tokens is {max_tokens}, above this server's limit of {cap} "
                                 f"(JARVIS_MAX_TOKENS_CAP).", param="max_tokens", code="max_tokens_too_large")
        if ids is not None and prompt is None:  # the client sent token ids
            score_bos = True
            bad = [t for t in ids if info.vocab_size is not None and not 0 <= t < info.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt holds token ids outside this model's vocabulary "
                                     f"(0..{info.vocab_size - 1}): {bad[:5]}", param="prompt",
                                     code="invalid_token_id")
            if self.engine.counts_tokens:
                prompt = self.engine.detokenize(ids)  # for echo
        elif prompt is not None and self.brings_bos(prompt):
            score_bos = True  # the text brings its own <bos>: never a second one
        if (prompt is not None or ids is not None) and self.engine.counts_tokens:
            if ids is None:
                ids = self.engine.tokenize(prompt or "", add_special=not score_bos)
            budget = info.max_model_len - len(ids)
            if max_tokens is None:
                if budget < 1:
                    raise ContextLengthExceeded(len(ids), 1, info.max_model_len)
                max_tokens = min(budget, cap or budget)
            elif max_tokens > budget:
                raise ContextLengthExceeded(len(ids), max_tokens, info.max_model_len)
        if max_tokens is None and cap is not None:  # an engine that counts remotely
            max_tokens = cap
        return replace(request, adapter=served.adapter, compiled_constraint=compiled, prompt=prompt, stop=stop,
                       prompt_token_ids=ids, score_bos=score_bos, max_tokens=max_tokens, tool_parser=parser)

    def _with_call_constraint(self, request: GenerationRequest) -> GenerationRequest:
        """A required call (tool_choice "required" or a named function) is decoded under the call's JSON
        schema, unless the engine handles tools itself."""
        tool_use = request.tool_use
        if tool_use is None or not tool_use.constrained or self.engine.handles_tools:
            return request
        if request.constraint is not None:
            raise InvalidRequest(f"{request.constraint.param} cannot be combined with tool_choice "
                                 f"{tool_use.choice!r}: the answer is a tool call.", param=request.constraint.param,
                                 code="invalid_value")
        return replace(request, constraint=OutputConstraint("json_schema", call_schema(tool_use), "tools"))

    @staticmethod
    def _render_chat(fmt: ChatFormat, request: GenerationRequest) -> str:
        """The prompt of a chat: plain, or with the functions offered and the calls made so far (the
        format's own tool syntax where it has one, else Jarvis's convention)."""
        messages, tool_use = request.messages or [], request.tool_use
        if tool_use is None and not uses_tools(messages):
            return fmt(messages, True)
        if fmt.tool_prompt is not None:
            offered = tool_use.offered if tool_use is not None else ()
            return fmt.tool_prompt(template_messages(messages),
                                   [{"type": "function", "function": f} for f in offered], True)
        return fmt(convention_messages(messages, tool_use), True)

    def brings_bos(self, text: str) -> bool:
        """The text begins with the model's <bos>: tokenize it without adding another."""
        bos = self.require_ready().bos_token
        return bool(bos) and text.startswith(bos)

    def _check_supported(self, request: GenerationRequest) -> Any:
        """Refuse what the engine cannot honour (a 400 naming the field); the compiled output constraint."""
        asked = {"top_k": request.top_k not in (0, -1), "min_p": request.min_p > 0,
                 "repetition_penalty": request.repetition_penalty != 1.0, "logit_bias": bool(request.logit_bias)}
        for feature, used in asked.items():
            if used and feature not in self.engine.supports:
                raise InvalidRequest(f"`{feature}` is not supported by the {self.engine.name} engine; omit it or "
                                     f"serve with an engine that has it.", param=feature, code="unsupported_parameter")
        tool_use = request.tool_use
        if tool_use is not None and tool_use.offered and not self.engine.handles_tools:
            if self.engine.applies_chat_template:
                raise InvalidRequest(f"tools are not supported by the {self.engine.name} engine.", param="tools",
                                     code="unsupported_parameter")
            if not tool_use.constrained and request.constraint is not None:
                raise InvalidRequest(f"{request.constraint.param} cannot be combined with tools under tool_choice "
                                     f"auto on the {self.engine.name} engine: the output would be held to the "
                                     f"format and no call could be made. Use tool_choice required or a named "
                                     f"function, or leave one of them out.", param=request.constraint.param,
                                     code="unsupported_parameter")
        constraint = request.constraint
        if constraint is None:
            return None
        if constraint.kind not in self.engine.supports:
            raise InvalidRequest(f"{constraint.param}: constrained decoding to {constraint.kind.replace('_', ' ')} is "
                                 f"not supported by the {self.engine.name} engine.", param=constraint.param,
                                 code="unsupported_parameter")
        try:
            return self.engine.compile_constraint(constraint)
        except ValueError as exc:
            raise InvalidRequest(f"{constraint.param}: the {self.engine.name} engine cannot compile this "
                                 f"{constraint.kind.replace('_', ' ')}: {exc}", param=constraint.param,
                                 code="invalid_response_format") from None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._started(request)
        try:
            async with self.admission.slot():
                result = await self._engine_generate(request)
        except BaseException as exc:
            self._finished(request, None, exc)
            raise _as_api_error(exc)  # noqa: B904  (the error it returns carries its cause)
        self._finished(request, result, None)
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The engine's chunks; the finished hook gets the text and usage (no logprobs) of the stream."""
        self._started(request)
        error: BaseException | None = None
        parts: list[str] = []
        calls: list[ToolCallDelta] = []
        last: GenerationChunk | None = None
        try:
            async with self.admission.slot():
                async for chunk in self._engine_stream(request):
                    parts.append(chunk.text)
                    calls.extend(chunk.tool_calls)
                    last = chunk
                    yield chunk
        except BaseException as exc:
            error = exc
            raise _as_api_error(exc)  # noqa: B904  (the error it returns carries its cause)
        finally:
            result = None
            if error is None and last is not None and last.finish_reason is not None:
                result = GenerationResult("".join(parts), last.finish_reason, last.prompt_tokens or 0,
                                          last.completion_tokens or 0, tool_calls=whole_calls(calls))
            self._finished(request, result, error)

    # Every engine call passes through one of these two, once: the engine's request counters, the tokens
    # it generated and the first token's arrival are kept here, not by each engine.

    async def _engine_generate(self, request: GenerationRequest) -> GenerationResult:
        stats = self.engine.stats
        stats.requests_started += 1
        result = None
        try:
            result = await self.engine.generate(request)
            stats.tokens_generated += result.completion_tokens
            if request.tool_parser is not None:
                result = _calls_of_result(request.tool_parser(), result)
            return result
        finally:
            stats.requests_finished += 1
            stats.requests_cancelled += result is None

    async def _engine_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        stats = self.engine.stats
        stats.requests_started += 1
        counted, finished = 0, False
        parser = request.tool_parser() if request.tool_parser is not None else None
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
                    if chunk.finish_reason == "stop" and calls:
                        chunk.finish_reason = "tool_calls"
                    if not (chunk.text or chunk.tool_calls or chunk.logprobs or chunk.finish_reason):
                        continue
                yield chunk
        finally:
            stats.requests_finished += 1
            stats.requests_cancelled += not finished

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


def _calls_of_result(parser: Any, result: GenerationResult) -> GenerationResult:
    """A whole output read by a tool-call parser: the content outside the calls, and the calls."""
    text, deltas = parser.feed(result.text)
    rest, more = parser.finish()
    calls = whole_calls([*deltas, *more])
    if result.finish_reason == "length":  # the last call may be cut off: a client could not send it back
        calls = [c for c in calls if _is_json(c.arguments)]
    reason = "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason
    return replace(result, text=text + rest, tool_calls=calls, finish_reason=reason)


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
