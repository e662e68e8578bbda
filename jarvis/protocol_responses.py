"""Pydantic models of OpenAI's Responses API wire format (`/v1/responses`): the request, its input items,
tools and text format, and the response object with its output items.

Request models forbid unknown fields like `jarvis.protocol`'s, so a field Jarvis does not know is a 400
naming it. `input` and `tools` are kept as plain JSON at the top level and parsed item by item
(`jarvis.serving.responses`), so that an error names the exact item, `input[2].content[0].type` or
`tools[1].type`, instead of every member of a union. Fields OpenAI has and Jarvis cannot honour
(`reasoning`, `include`, `truncation: "auto"`, built-in tools, ...) are known here and refused there
with a 400 naming them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jarvis.protocol import _Request

# --- the request ------------------------------------------------------------------------------------


class TextFormat(_Request):
    """`text.format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponseStreamOptions(_Request):
    include_obfuscation: bool | None = Field(None, description="Accepted; Jarvis never pads its events.")


class ResponsesRequest(_Request):
    """`POST /v1/responses`."""

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(
        description="A string (one user message) or a list of items: messages (role user, system, developer or "
                    "assistant; content a string or input_text/output_text parts), function_call and "
                    "function_call_output.")
    instructions: str | None = Field(None, description="A system message put first; not carried over from "
                                                       "previous_response_id.")
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = Field(
        None, description='Function tools: {"type": "function", "name", "description", "parameters", "strict"}.')
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "auto", "required", {"type": "function", "name"} or '
                          '{"type": "allowed_tools", "mode", "tools"}.')
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1, description="Calls to built-in tools (Jarvis has none).")
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: ResponseStreamOptions | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    # known, refused unless empty (see jarvis.serving.responses)
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    # accepted and ignored: bookkeeping that changes nothing in a generation (as in jarvis.protocol)
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None


# --- input items (parsed one by one from `input`) ----------------------------------------------------


class InputText(_Request):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = None  # an output_text handed back
    logprobs: list[dict[str, Any]] | None = None


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionToolParam(_Request):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="Default true, as OpenAI's Responses API has it.")


#: Tool types OpenAI runs itself; Jarvis has none of them (a 400 naming `tools[i].type`).
BUILT_IN_TOOLS = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
                  "file_search", "computer", "computer_use", "computer_use_preview", "code_interpreter",
                  "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom", "tool_search")


# --- the response -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """OpenAI's Responses ids: `resp_…`, `msg_…`, `fc_…` (an underscore, then hex)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputMessage | FunctionCall] = []
    usage: ResponseUsage | None = None
    # the request, echoed
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_output_tokens: int | None = None
    text: dict[str, Any] = {"format": {"type": "text"}}
    truncation: Literal["disabled"] = "disabled"
    store: bool = True
    metadata: dict[str, str] = {}
    user: str | None = None
    background: bool = False
    reasoning: dict[str, Any] = {"effort": None, "summary": None}
    service_tier: str = "default"
    top_logprobs: int = 0


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)
