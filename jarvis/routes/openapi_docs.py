"""What the OpenAPI schema says about routes that parse their own bodies.

The OpenAI routes read and validate the JSON body themselves, so that a bad
field comes back in OpenAI's error shape with `param` naming it. Litestar
therefore cannot see their request models; `json_body(Model)` gives such a
handler an `operation_class` that documents the body with the pydantic model's
own JSON schema, and `document_errors(app)` documents the OpenAI error object
for every status any route (plugins' too) answers with, unless the route documents
its own (another API's error shape, as the Tinker routes do). Clients, generated SDKs and schema
fuzzers then see what the server really accepts and returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, RequestBody, Schema
from pydantic import BaseModel

from jarvis import protocol as wire

ERROR_STATUSES = {400: "Invalid request (the `param` names the field), or the context window is exceeded.",
                  401: "Missing or wrong API key.",
                  403: "The API key lacks the scope the operation needs (admin).",
                  404: "Unknown model, adapter or route, or an object another API key owns.",
                  413: "Request body too large.", 429: "Server at capacity or rate limit reached (see Retry-After).",
                  503: "The engine is loading or unavailable."}


class JsonSchema(Schema):
    """A schema given as plain JSON Schema (a pydantic model's), emitted as is."""

    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__()
        self.raw = raw

    def to_schema(self) -> dict[str, Any]:
        return self.raw


def inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every `#/$defs/...` reference replaced by its definition (the models are not recursive);
    `schema` itself is left as it is."""
    definitions = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(dict(definitions[ref.removeprefix("#/$defs/")]))
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve({key: value for key, value in schema.items() if key != "$defs"})


def json_body(model: type[BaseModel]) -> type[Operation]:
    """An `operation_class` documenting a JSON request body of `model`."""
    body = RequestBody(content={"application/json": OpenAPIMediaType(
        schema=JsonSchema(inline_definitions(model.model_json_schema())))}, required=True)

    @dataclass
    class JsonBodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    JsonBodyOperation.__name__ = f"{model.__name__}Operation"
    return JsonBodyOperation


def own_errors_body(body: dict[str, Any] | None, error: Schema, statuses: dict[int, str],
                    name: str) -> type[Operation]:
    """An `operation_class` for a route of another API (Tinker's, Anthropic's): its JSON body's schema, if any
    (a pydantic model's `model_json_schema()`), and its errors in that API's own shape `error`, which
    `document_errors` then leaves as they are."""
    request_body = None if body is None else RequestBody(content={"application/json": OpenAPIMediaType(
        schema=JsonSchema(inline_definitions(body)))}, required=True)

    @dataclass
    class OwnErrorsOperation(Operation):
        documents_own_errors = True

        def __post_init__(self) -> None:
            if request_body is not None:
                self.request_body = request_body
            self.responses = {**(self.responses or {}), **{
                str(status): OpenAPIResponse(description=text,
                                             content={"application/json": OpenAPIMediaType(schema=error)})
                for status, text in statuses.items()}}

    OwnErrorsOperation.__name__ = name
    return OwnErrorsOperation


def document_errors(app: Litestar) -> None:
    """Every operation's error statuses, with the OpenAI error object Jarvis really sends for them."""
    schema = app.openapi_schema
    error = JsonSchema(inline_definitions(wire.ErrorResponse.model_json_schema()))
    for path, item in (schema.paths or {}).items():
        if path.startswith("/schema"):
            continue
        for method in ("get", "post", "put", "patch", "delete"):
            operation = getattr(item, method, None)
            if operation is None:
                continue
            if getattr(operation, "documents_own_errors", False):  # another API's shape (the Tinker routes)
                continue
            operation.responses = operation.responses or {}
            for status, text in ERROR_STATUSES.items():
                operation.responses[str(status)] = OpenAPIResponse(
                    description=text, content={"application/json": OpenAPIMediaType(schema=error)})
