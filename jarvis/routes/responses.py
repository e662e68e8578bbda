"""The Responses API over HTTP: POST /v1/responses, GET and DELETE /v1/responses/{id}, and
GET /v1/responses/{id}/input_items.

Creating one parses the body (an unknown field is a 400 naming it), admits the client like every
generation route, and hands the rest to `jarvis.serving.responses`, which checks the request and starts
the chat run before anything is sent: every 400/404 is a plain error, and a stream answers with OpenAI's
typed events (`event:` + `data:` lines, no `[DONE]`). Retrieval and deletion read the store of the
server's state dir and need no engine. A response belongs to the key that made it: another key gets the
404 of an unknown id (`jarvis.auth`).
"""

from __future__ import annotations

from typing import Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.response import Response

from jarvis import protocol_responses as rwire
from jarvis.auth import principal_of, visible
from jarvis.errors import InvalidRequest, NotFound
from jarvis.responses_store import ResponseStore, StoredResponse, responses_store
from jarvis.routes.openai import client_of, reply, runtime_of
from jarvis.routes.openapi_docs import json_body
from jarvis.server import server_of
from jarvis.serving.responses import response_reply


def store_of(request: Request) -> ResponseStore:
    return responses_store(server_of(request).settings.state_path)


def not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


async def owned_response(request: Request, response_id: str) -> StoredResponse:
    """The stored response, if the caller may see it; else the 404 of an unknown id."""
    store = store_of(request)
    found = await store.run(store.find, response_id)
    if found is None or not visible(principal_of(request), found.owner, f"{request.method} {request.url.path}",
                                      response_id):
        raise not_found(response_id)
    return found


class ResponsesController(Controller):
    path = "/v1/responses"
    tags = ["OpenAI"]

    @post("/", status_code=200, summary="Create a model response (OpenAI Responses API).",
          operation_class=json_body(rwire.ResponsesRequest))
    async def create_response(self, request: Request) -> Response:
        return reply(await response_reply(runtime_of(request), await request.body(), client_of(request),
                                          store_of(request), principal_of(request)))

    @get("/{response_id:str}", summary="Retrieve a stored response.")
    async def get_response(self, request: Request, response_id: str) -> dict[str, Any]:
        return (await owned_response(request, response_id)).response

    @delete("/{response_id:str}", status_code=200, summary="Delete a stored response.")
    async def delete_response(self, request: Request, response_id: str) -> dict[str, Any]:
        await owned_response(request, response_id)
        store = store_of(request)
        if not await store.run(store.delete, response_id):
            raise not_found(response_id)
        return rwire.dump(rwire.DeletedResponse(id=response_id))

    @get("/{response_id:str}/input_items", summary="List the input items a stored response answered "
                                                   "(earlier turns of its conversation included).")
    async def list_input_items(self, request: Request, response_id: str, after: str | None = None,
                               limit: int = 20, order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise InvalidRequest(f"limit must be between 1 and 100, got {limit}.", param="limit",
                                 code="invalid_value")
        items = (await owned_response(request, response_id)).context
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise InvalidRequest(f"after {after!r} is not an item of this response.", param="after",
                                     code="invalid_value")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
