"""Anthropic's Messages API over HTTP: POST /v1/messages and POST /v1/messages/count_tokens.

Clients that speak Anthropic's protocol (the `anthropic` SDK, `langchain-anthropic`, coding agents) point their
base URL at the server unchanged: the key comes as `x-api-key` or `Authorization: Bearer`, `anthropic-version`
and `anthropic-beta` are accepted, and every error, the guard's 401/403 included, is Anthropic's
`{"type": "error", "error": {"type", "message"}}` with the same status. The work is
`jarvis.serving.messages`, on the chat path.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Controller, Request, post
from litestar.exceptions import HTTPException
from litestar.openapi.spec import Operation
from litestar.response import Response
from pydantic import BaseModel

from jarvis import protocol_anthropic as awire
from jarvis.errors import APIError
from jarvis.routes.openai import client_of, reply, runtime_of
from jarvis.routes.openapi_docs import ERROR_STATUSES, JsonSchema, inline_definitions, own_errors_body
from jarvis.serving.messages import count_tokens, messages_reply

log = logging.getLogger("jarvis.app")


def anthropic_error(_: Request, exc: Exception) -> Response:
    """Any error of these routes in Anthropic's shape, with its status (and Retry-After on a 429)."""
    if isinstance(exc, APIError):
        status, message, headers = exc.status_code, exc.message, exc.headers or None
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = getattr(exc, "headers", None)
    else:
        log.exception("unhandled error", exc_info=exc)
        status, message, headers = 500, f"Internal server error: {type(exc).__name__}", None
    return Response(awire.error_body(status, message), status_code=status, headers=headers)


def anthropic_body(model: type[BaseModel]) -> type[Operation]:
    """An `operation_class` documenting `model` as the JSON body and the errors in Anthropic's shape."""
    error = JsonSchema(inline_definitions(awire.ErrorResponse.model_json_schema()))
    return own_errors_body(model.model_json_schema(), error, ERROR_STATUSES, f"{model.__name__}Operation")


class MessagesController(Controller):
    path = "/v1/messages"
    tags = ["Anthropic"]
    # Every class the app maps in OpenAI's shape is mapped again here: the handler nearest the route wins.
    exception_handlers = {APIError: anthropic_error, HTTPException: anthropic_error, Exception: anthropic_error}

    @post("/", status_code=200, summary="Create a message (Anthropic Messages API).",
          operation_class=anthropic_body(awire.MessagesRequest))
    async def create_message(self, request: Request) -> Response:
        return reply(await messages_reply(runtime_of(request), await request.body(), client_of(request)))

    @post("/count_tokens", status_code=200, summary="Count the input tokens of a message request.",
          operation_class=anthropic_body(awire.CountTokensRequest))
    async def count_message_tokens(self, request: Request) -> dict[str, Any]:
        return await count_tokens(runtime_of(request), await request.body(), client_of(request))
