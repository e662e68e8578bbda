"""The OpenAI surface over HTTP: /v1/models, /v1/completions, /v1/chat/completions.

Each handler parses the body into a `jarvis.protocol` model, asks the runtime
to admit the client, and hands the rest to `jarvis.serving` (generations,
responses, SSE events). Errors raised before the first byte carry their HTTP
status; an error after streaming began is sent as a final
`data: {"error": ...}` event, as vLLM's server does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from litestar import Controller, Request, get, post
from litestar.response import Response, Stream
from pydantic import BaseModel

from jarvis import protocol as wire
from jarvis.errors import InvalidRequest
from jarvis.limits import client_id
from jarvis.routes.openapi_docs import json_body
from jarvis.runtime import EngineRuntime
from jarvis.serving.chat import start_chat
from jarvis.serving.completions import completion_events, completion_generations, create_completion
from jarvis.serving.requests import decode_json, validate_body

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    return validate_body(decode_json(await request.body()), model)


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
        run = start_chat(runtime, body, client)
        if body.stream:
            return sse_response(run.sse(bool(body.stream_options and body.stream_options.include_usage)))
        return Response(await run.result())

    @post("/completions", status_code=200, summary="Create a text completion (OpenAI-compatible).",
          operation_class=json_body(wire.CompletionRequest))
    async def completions(self, request: Request) -> Response:
        body = await parse_body(request, wire.CompletionRequest)
        if body.stream and len(body.prompts) > 1:
            raise InvalidRequest("Streaming supports one prompt per request.", param="prompt")
        runtime, client = admit(request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gens = completion_generations(runtime, body, client)
            return sse_response(completion_events(runtime, gens, include_usage))
        return Response(await create_completion(runtime, body, client))


def sse_response(events: AsyncIterator[str]) -> Stream:
    return Stream(events, media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
