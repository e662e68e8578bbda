"""The OpenAI surface over HTTP: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

A handler hands the raw body and who is asking (`client_of`: an API key's fingerprint or the peer address)
to `jarvis.serving`, which validates, admits, prepares and runs it, and wraps what comes back: a JSON body, or
SSE events. Errors raised before the first byte carry their HTTP status; an error after streaming began is
sent as a final `data: {"error": ...}` event, as vLLM's server does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

from litestar import Controller, Request, get, post
from litestar.response import Response, Stream
from pydantic import BaseModel

from jarvis import bodies
from jarvis import protocol as wire
from jarvis.auth import bearer_token, principal_of
from jarvis.limits import client_id
from jarvis.protocol_embeddings import EmbeddingsRequest
from jarvis.routes.openapi_docs import json_body
from jarvis.runtime import Runtime
from jarvis.server import server_of
from jarvis.serving.chat import chat_reply
from jarvis.serving.completions import completion_reply
from jarvis.serving.embeddings import embeddings_reply

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    return bodies.parse_body(await request.body(), model)


def runtime_of(request: Request) -> Runtime:
    return server_of(request).runtime


def client_of(request: Request) -> str:
    """Who asks, for rate limits and logs: the key's owner-hash prefix on a server with keys, else a
    fingerprint of the bearer token sent, else the peer address."""
    principal = principal_of(request)
    if principal.owner is not None:
        return principal.label
    return client_id(bearer_token(request.headers), request.client.host if request.client else None)


def reply(result: dict[str, Any] | AsyncIterator[str]) -> Response:
    """A serving result as HTTP: a JSON body, or an SSE stream."""
    if isinstance(result, dict):
        return Response(result)
    return Stream(result, media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
        return reply(await chat_reply(runtime_of(request), await request.body(), client_of(request)))

    @post("/completions", status_code=200, summary="Create a text completion (OpenAI-compatible).",
          operation_class=json_body(wire.CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return reply(await completion_reply(runtime_of(request), await request.body(), client_of(request)))

    @post("/embeddings", status_code=200, summary="Create embeddings (OpenAI-compatible): mean-pooled, unit length.",
          operation_class=json_body(EmbeddingsRequest))
    async def embeddings(self, request: Request) -> Response:
        return reply(await embeddings_reply(runtime_of(request), await request.body(), client_of(request)))
