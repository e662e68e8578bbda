"""The OpenAI surface: /v1/models, /v1/completions, /v1/chat/completions.

Each handler parses the body into a `jarvis.protocol` model, turns it into a
`GenerationRequest`, lets the runtime prepare and run it, and renders the
OpenAI response or its Server-Sent Events. Errors raised before the first
byte carry their HTTP status; an error after streaming began is sent as a
final `data: {"error": ...}` event, as vLLM's server does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from litestar import Controller, Request, get, post
from litestar.response import Response, Stream
from pydantic import BaseModel, ValidationError

from jarvis import protocol as wire
from jarvis.engine import GenerationChunk, GenerationRequest, GenerationResult, TokenLogprob
from jarvis.errors import APIError, InvalidRequest
from jarvis.limits import client_id
from jarvis.routes.openapi_docs import json_body
from jarvis.runtime import EngineRuntime

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    return validate_body(data, model)


def validate_body(data: Any, model: type[M]) -> M:
    """Validate a decoded JSON body into `model`, raising the 400 the HTTP route would return."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}" if param else first["msg"],
                             param=param, code="invalid_value") from None


def runtime_of(request: Request) -> EngineRuntime:
    return request.app.state.runtime


def admit(request: Request) -> tuple[EngineRuntime, str]:
    """The runtime, once it agrees to take one more request from this client (else 429 or 503)."""
    runtime = runtime_of(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    client = client_id(token.strip() if scheme.lower() == "bearer" else None,
                       request.client.host if request.client else None)
    runtime.admit(client)
    return runtime, client


class OpenAIController(Controller):
    path = "/v1"
    tags = ["OpenAI"]

    @get("/models", summary="List the served models (base model and loaded adapters).")
    async def list_models(self, request: Request) -> wire.ModelList:
        runtime = runtime_of(request)
        return wire.ModelList(data=[
            wire.ModelCard(id=m.id, created=m.created, owned_by=m.owned_by, max_model_len=m.max_model_len,
                           parent=runtime.model_id if m.adapter else None, root=runtime.model_id)
            for m in runtime.models()])

    @get("/models/{model_id:path}", summary="Describe one served model.")
    async def get_model(self, request: Request, model_id: str) -> wire.ModelCard:
        runtime = runtime_of(request)
        m = runtime.resolve_model(model_id.lstrip("/"))
        return wire.ModelCard(id=m.id, created=m.created, owned_by=m.owned_by, max_model_len=m.max_model_len,
                              parent=runtime.model_id if m.adapter else None, root=runtime.model_id)

    @post("/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible).",
          operation_class=json_body(wire.ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        body = await parse_body(request, wire.ChatCompletionRequest)
        runtime, client = admit(request)
        if body.stream:
            gen = chat_generation(runtime, body, client)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(chat_events(runtime, gen, include_usage))
        return Response(await create_chat_completion(runtime, body, client))

    @post("/completions", status_code=200, summary="Create a text completion (OpenAI-compatible).",
          operation_class=json_body(wire.CompletionRequest))
    async def completions(self, request: Request) -> Response:
        body = await parse_body(request, wire.CompletionRequest)
        if body.stream and len(body.prompts) > 1:
            raise InvalidRequest("Streaming supports one prompt per request.", param="prompt")
        runtime, client = admit(request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = completion_generations(runtime, body, client)[0]
            return sse_response(completion_events(runtime, gen, include_usage))
        return Response(await create_completion(runtime, body, client))


# --- the non-streaming calls, shared with plugins (the batch runner) --------------------------------


def chat_generation(runtime: EngineRuntime, body: wire.ChatCompletionRequest,
                    client: str | None = None) -> GenerationRequest:
    return runtime.prepare(GenerationRequest(
        prompt=None, model=body.model, kind="chat", client=client,
        messages=[m.normalised() for m in body.messages],
        max_tokens=body.token_limit, temperature=body.temperature, top_p=body.top_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        stop=body.stop, seed=body.seed, logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0))


def completion_generations(runtime: EngineRuntime, body: wire.CompletionRequest,
                           client: str | None = None) -> list[GenerationRequest]:
    return [runtime.prepare(GenerationRequest(
        prompt=prompt, model=body.model, kind="completion", max_tokens=body.max_tokens, client=client,
        temperature=body.temperature, top_p=body.top_p, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, stop=body.stop, seed=body.seed,
        logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0, echo=body.echo))
        for prompt in body.prompts]


async def create_chat_completion(runtime: EngineRuntime, body: wire.ChatCompletionRequest,
                                 client: str | None = None) -> dict[str, Any]:
    """Run one chat completion to the end and return the OpenAI response body."""
    result = await runtime.generate(chat_generation(runtime, body, client))
    return wire.dump(wire.ChatCompletion(
        id=wire.new_id("chatcmpl"), created=wire.now(), model=body.model,
        choices=[wire.ChatChoice(index=0, message=wire.AssistantMessage(content=result.text),
                                 finish_reason=result.finish_reason,
                                 logprobs=chat_logprobs(result.logprobs) if body.logprobs else None)],
        usage=usage(result.prompt_tokens, result.completion_tokens)))


async def create_completion(runtime: EngineRuntime, body: wire.CompletionRequest,
                            client: str | None = None) -> dict[str, Any]:
    """Run a text completion (every prompt, concurrently) and return the OpenAI response body."""
    gens = completion_generations(runtime, body, client)
    results = await asyncio.gather(*(runtime.generate(gen) for gen in gens))  # a batching engine batches them
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (gen, result) in enumerate(zip(gens, results)):
        text = (gen.prompt or "") + result.text if gen.echo else result.text
        choices.append(wire.CompletionChoice(
            index=index, text=text, finish_reason=result.finish_reason,
            logprobs=completion_logprobs(result, gen.echo) if gen.logprobs else None))
        prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
    return wire.dump(wire.Completion(
        id=wire.new_id("cmpl"), created=wire.now(), model=body.model, choices=choices,
        usage=usage(prompt_tokens, completion_tokens)))


# --- rendering ------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> wire.Usage:
    return wire.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)


def chat_logprobs(entries: list[TokenLogprob]) -> wire.ChatLogprobs:
    return wire.ChatLogprobs(content=[
        wire.ChatTokenLogprob(token=e.token, logprob=e.logprob if e.logprob is not None else 0.0,
                              bytes=e.bytes, top_logprobs=[
                                  wire.TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                  for t, lp in e.top])
        for e in entries])


def completion_logprobs(result: GenerationResult, echo: bool, offset: int = 0) -> wire.CompletionLogprobs:
    entries = [*(result.prompt_logprobs or [])] if echo else []
    entries += result.logprobs
    out = wire.CompletionLogprobs()
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append(dict(e.top) if e.top else None)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def sse_response(events: AsyncIterator[str]) -> Stream:
    return Stream(events, media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def _events(runtime: EngineRuntime, gen: GenerationRequest, include_usage: bool,
                  render: Callable[[GenerationChunk | None], dict[str, Any]],
                  render_usage: Callable[[wire.Usage], dict[str, Any]]) -> AsyncIterator[str]:
    prompt_tokens = completion_tokens = 0
    try:
        opening = render(None)
        if opening:
            yield sse(opening)
        async for chunk in runtime.stream(gen):
            if chunk.text or chunk.logprobs or chunk.finish_reason or chunk.prompt_logprobs:
                yield sse(render(chunk))
            if chunk.finish_reason is not None:
                prompt_tokens = chunk.prompt_tokens or 0
                completion_tokens = chunk.completion_tokens or 0
        if include_usage:
            yield sse(render_usage(usage(prompt_tokens, completion_tokens)))
    except APIError as exc:
        yield sse(exc.to_body())
    yield sse("[DONE]")


def chat_events(runtime: EngineRuntime, gen: GenerationRequest, include_usage: bool) -> AsyncIterator[str]:
    ident, created = wire.new_id("chatcmpl"), wire.now()

    def chunk_of(choices: list[wire.ChatChunkChoice], usage_: wire.Usage | None = None) -> dict[str, Any]:
        return wire.dump(wire.ChatCompletionChunk(id=ident, created=created, model=gen.model,
                                                  choices=choices, usage=usage_))

    def render(chunk: GenerationChunk | None) -> dict[str, Any]:
        if chunk is None:  # OpenAI opens every chat stream with the role
            return chunk_of([wire.ChatChunkChoice(index=0, delta=wire.ChatDelta(role="assistant", content=""))])
        return chunk_of([wire.ChatChunkChoice(
            index=0, delta=wire.ChatDelta(content=chunk.text or None) if chunk.text else wire.ChatDelta(),
            finish_reason=chunk.finish_reason,
            logprobs=chat_logprobs(chunk.logprobs) if gen.logprobs and chunk.logprobs else None)])

    return _events(runtime, gen, include_usage, render, lambda u: chunk_of([], u))


def completion_events(runtime: EngineRuntime, gen: GenerationRequest,
                      include_usage: bool) -> AsyncIterator[str]:
    ident, created = wire.new_id("cmpl"), wire.now()
    state = {"offset": 0, "echoed": False}

    def chunk_of(choices: list[wire.CompletionChoice], usage_: wire.Usage | None = None) -> dict[str, Any]:
        return wire.dump(wire.Completion(id=ident, created=created, model=gen.model, choices=choices,
                                         usage=usage_))

    def render(chunk: GenerationChunk | None) -> dict[str, Any]:
        if chunk is None:
            return {}
        text = chunk.text
        entries = list(chunk.logprobs)
        if gen.echo and not state["echoed"]:
            state["echoed"] = True
            text = (gen.prompt or "") + text
            entries = [*(chunk.prompt_logprobs or []), *entries]
        logprobs = None
        if gen.logprobs:
            logprobs = completion_logprobs(
                GenerationResult("", "stop", 0, 0, logprobs=entries), echo=False, offset=state["offset"])
            state["offset"] += sum(len(e.token) for e in entries)
        return chunk_of([wire.CompletionChoice(index=0, text=text, finish_reason=chunk.finish_reason,
                                               logprobs=logprobs)])

    return _events(runtime, gen, include_usage, render, lambda u: chunk_of([], u))
