"""Pydantic models of Anthropic's Messages API wire format (`/v1/messages`, `/v1/messages/count_tokens`).

Requests forbid unknown fields, as `jarvis.protocol`'s do, so a field Jarvis does not know (`container`,
`mcp_servers`, ...) is a 400 naming it. Message content and tools are kept as plain JSON at the top level and
parsed block by block (`jarvis.serving.messages`), so an error names the exact place,
`messages[2].content[1].type`, not every member of a union. `cache_control` on a block or tool is accepted: it
is a hint about Anthropic's prompt cache and changes nothing in the answer.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jarvis.protocol import MAX_STOP_SEQUENCES, _Request

#: Anthropic's error types by HTTP status (`{"type": "error", "error": {"type", "message"}}`).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


class CacheControl(_Request):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Request):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = Field(None, max_length=0, description="Jarvis cites nothing.")


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class InputMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description="A string, or content blocks: text, tool_use (assistant), tool_result (user).")


class CustomTool(_Request):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="A JSON Schema of the tool's input object.")
    cache_control: CacheControl | None = None


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="The tool to call, with type 'tool'.")
    disable_parallel_tool_use: bool | None = None


class Metadata(_Request):
    user_id: str | None = Field(None, max_length=256)


class JsonOutputFormat(_Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OutputConfig(_Request):
    format: JsonOutputFormat | None = Field(None, description="The output matches this JSON schema (constrained "
                                                              "decoding).")
    effort: None = Field(None, description="Not supported: one effort level here; must be omitted.")


class ThinkingConfig(_Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class _Conversation(_Request):
    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = Field(
        None, description='Client tools: {"name", "description", "input_schema"}. Server tools are refused.')
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = Field(None, description="Only {\"type\": \"disabled\"}: the served chat "
                                                              "format produces no thinking.")


class MessagesRequest(_Conversation):
    """`POST /v1/messages`."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    # Accepted: they choose among Anthropic's deployments, caches and accounts and change nothing in the answer.
    cache_control: CacheControl | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard", "fast"] | None = None
    inference_geo: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class CountTokensRequest(_Conversation):
    """`POST /v1/messages/count_tokens`."""


# --- the response ---------------------------------------------------------------------------------------


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail

    model_config = ConfigDict(json_schema_extra={"description": "Anthropic's error object."})


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
