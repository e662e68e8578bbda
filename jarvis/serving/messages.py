"""Anthropic's Messages API on the chat path: a `MessagesRequest` → a chat completion → the `message` object
or its typed Server-Sent Events.

`chat_body` translates the request into a `ChatCompletionRequest` block by block (an error names
`messages[i].content[j]...` or `tools[i]...`), refusing what Jarvis cannot honour (images and documents on a
text model, server tools, thinking, a final assistant turn to continue); the chat run then does everything else
(rendering, tools, constrained decoding for `tool_choice` any/tool, the engine), so the two APIs share one
pipeline. `MessageRun.result` maps the chat result to content blocks; `MessageRun.events` streams as Anthropic
does:

    message_start, ping, then per content block: content_block_start, content_block_delta
    (text_delta | input_json_delta)..., content_block_stop; message_delta (stop_reason, usage), message_stop.

An error after the stream began is an `error` event, and the stream ends there. `count_tokens` prepares the
same chat request and counts its prompt: exactly the `input_tokens` a generation reports.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from jarvis import protocol as wire
from jarvis import protocol_anthropic as awire
from jarvis.bodies import parse_body, validate_body
from jarvis.errors import APIError, EngineFailure, InvalidRequest
from jarvis.serving.chat import ChatRun, ChoiceEvent, chat_generations, start_chat
from jarvis.serving.render import compact_json

if TYPE_CHECKING:
    from jarvis.runtime import Runtime

#: How these requests are named to the request hooks (telemetry's `api` label).
API = "anthropic"
#: Content block types of Anthropic's API that a text model cannot take.
MEDIA_BLOCKS = ("image", "document", "search_result", "container_upload")


def _unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def _block_type(raw: Any, where: str) -> str:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if not isinstance(kind, str):
        raise InvalidRequest(f"{where}.type: a content block is an object with a 'type'.", param=f"{where}.type",
                             code="invalid_value")
    if kind in MEDIA_BLOCKS:
        raise _unsupported(f"{where}.type", f"{where}.type: {kind!r} blocks are not supported: the served model "
                                            "reads text only.")
    return kind


def _text_of(blocks: list[dict[str, Any]], where: str) -> str:
    """The text of a list of text blocks (a system prompt, a tool result's content)."""
    parts = []
    for j, raw in enumerate(blocks):
        kind = _block_type(raw, f"{where}[{j}]")
        if kind != "text":
            raise InvalidRequest(f"{where}[{j}].type: expected 'text' here, got {kind!r}.",
                                 param=f"{where}[{j}].type", code="invalid_value")
        parts.append(validate_body(raw, awire.TextBlock, f"{where}[{j}]").text)
    return "".join(parts)


def chat_messages(body: awire._Conversation) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages: a user turn's tool_result blocks become tool messages (before
    its text), an assistant turn's tool_use blocks its tool_calls."""
    out: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(b.text for b in body.system)
        out.append({"role": "system", "content": system})
    calls: set[str] = set()
    for i, msg in enumerate(body.messages):
        where = f"messages[{i}].content"
        blocks = [{"type": "text", "text": msg.content}] if isinstance(msg.content, str) else msg.content
        text: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        for j, raw in enumerate(blocks):
            at = f"{where}[{j}]"
            kind = _block_type(raw, at)
            if kind == "text":
                text.append(validate_body(raw, awire.TextBlock, at).text)
            elif kind == "tool_use" and msg.role == "assistant":
                use = validate_body(raw, awire.ToolUseBlock, at)
                calls.add(use.id)
                tool_calls.append({"id": use.id, "type": "function",
                                   "function": {"name": use.name, "arguments": json.dumps(use.input)}})
            elif kind == "tool_result" and msg.role == "user":
                result = validate_body(raw, awire.ToolResultBlock, at)
                if result.tool_use_id not in calls:
                    raise InvalidRequest(f"{at}.tool_use_id: {result.tool_use_id!r} answers no tool_use block of an "
                                         "earlier assistant turn.", param=f"{at}.tool_use_id", code="invalid_value")
                content = result.content or ""
                content = content if isinstance(content, str) else _text_of(content, f"{at}.content")
                out.append({"role": "tool", "tool_call_id": result.tool_use_id,
                            "content": f"Error: {content}" if result.is_error else content})
            elif kind in ("tool_use", "tool_result"):
                raise InvalidRequest(f"{at}.type: {kind!r} blocks belong in "
                                     f"{'assistant' if kind == 'tool_use' else 'user'} turns.",
                                     param=f"{at}.type", code="invalid_value")
            elif kind in ("thinking", "redacted_thinking"):
                raise _unsupported(f"{at}.type", f"{at}.type: {kind!r} blocks are not supported: the served chat "
                                                 "format produces no thinking.")
            else:
                raise InvalidRequest(f"{at}.type: unknown content block type {kind!r}; supported: text, tool_use "
                                     "(assistant), tool_result (user).", param=f"{at}.type", code="invalid_value")
        if text or not tool_calls and not (msg.role == "user" and out and out[-1]["role"] == "tool"):
            message: dict[str, Any] = {"role": msg.role, "content": "".join(text)}
            out.append(message)
        if tool_calls:
            if out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = tool_calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
    if body.messages[-1].role == "assistant" and out[-1].get("tool_calls"):
        raise InvalidRequest(f"messages[{len(body.messages) - 1}]: a final assistant turn is continued (a prefill), "
                             "so it cannot hold tool_use blocks; answer them with a user turn of tool_result blocks.",
                             param=f"messages[{len(body.messages) - 1}].content", code="invalid_value")
    return out


def chat_tools(body: awire._Conversation) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` of the chat request."""
    if body.thinking is not None and body.thinking.type != "disabled":
        raise _unsupported("thinking", f"thinking of type {body.thinking.type!r} is not supported: the served "
                                       "chat format produces no thinking. Omit it or send {\"type\": \"disabled\"}.")
    fields: dict[str, Any] = {}
    if body.tools:
        tools = []
        for i, raw in enumerate(body.tools):
            kind = raw.get("type") if isinstance(raw, dict) else None
            if kind not in (None, "custom"):
                raise _unsupported(f"tools[{i}].type", f"tools[{i}].type: server tool {kind!r} is not supported; "
                                                       "Jarvis serves client tools (name, description, input_schema).")
            tool = validate_body(raw, awire.CustomTool, f"tools[{i}]")
            function = {"name": tool.name, "parameters": tool.input_schema}
            if tool.description is not None:
                function["description"] = tool.description
            tools.append({"type": "function", "function": function})
        fields["tools"] = tools
    choice = body.tool_choice
    if choice is not None:
        names = [t["function"]["name"] for t in fields.get("tools", [])]
        if choice.type == "tool":
            if choice.name is None:
                raise InvalidRequest("tool_choice.name: a tool_choice of type 'tool' names the tool.",
                                     param="tool_choice.name", code="invalid_value")
            if choice.name not in names:
                raise InvalidRequest(f"tool_choice.name: {choice.name!r} is not among the tools "
                                     f"({', '.join(names) or 'none given'}).", param="tool_choice.name",
                                     code="invalid_value")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice.name is not None:
            raise InvalidRequest(f"tool_choice.name: only a tool_choice of type 'tool' names a tool, not "
                                 f"{choice.type!r}.", param="tool_choice.name", code="invalid_value")
        elif choice.type != "none" or names:
            if choice.type == "any" and not names:
                raise InvalidRequest("tool_choice: type 'any' needs tools.", param="tool_choice",
                                     code="invalid_value")
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use is not None and names:
            fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return fields


def chat_body(body: awire._Conversation, max_tokens: int) -> wire.ChatCompletionRequest:
    """The chat request that answers `body` (a count_tokens body counts as a `max_tokens` 1 generation)."""
    fields: dict[str, Any] = {"model": body.model, "messages": chat_messages(body), "max_tokens": max_tokens,
                              **chat_tools(body)}
    if body.messages[-1].role == "assistant":  # a prefill: the answer continues it
        fields.update(continue_final_message=True, add_generation_prompt=False)
    if isinstance(body, awire.MessagesRequest):
        fields.update(stop=body.stop_sequences or None, stream=body.stream,
                      **{k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                           ("top_k", body.top_k)) if v is not None})
        if body.output_config is not None and body.output_config.format is not None:
            fields["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": body.output_config.format.schema_}}
    try:
        return wire.ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # a value Anthropic's schema lets through and chat's refuses: a 400 all the same
        first = exc.errors()[0]
        param = CHAT_TO_ANTHROPIC.get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else None
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}" if param else first["msg"],
                             param=param, code="invalid_value") from None


#: Chat's name of a field → the Messages API's, for an error that names what the client sent.
CHAT_TO_ANTHROPIC = {"stop": "stop_sequences", "response_format": "output_config.format"}


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


def stop_reason(finish_reason: str | None, stop: str | None, asked: list[str] | None
                ) -> tuple[StopReason, str | None]:
    """Anthropic's (stop_reason, stop_sequence) of a chat choice's finish."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if stop is not None and stop in (asked or ()):  # the chat format's own end-of-turn string is the model's
        return "stop_sequence", stop
    return "end_turn", None


def tool_use_id(call_id: str | None) -> str:
    return "toolu_" + (call_id or awire.new_id("call")).removeprefix("call_")


def _tool_input(name: str, arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise EngineFailure(f"The model called {name!r} with input that is not a JSON object: {arguments[:200]!r}.")
    return value


class MessageRun:
    """A prepared Messages request: run it whole (`result`) or as Anthropic's events (`events`)."""

    def __init__(self, body: awire.MessagesRequest, run: ChatRun) -> None:
        self.body, self.run = body, run
        self.id = awire.new_id("msg")

    def message(self, content: list[dict[str, Any]], reason: tuple[StopReason, str | None] | tuple[None, None],
                usage: awire.Usage) -> dict[str, Any]:
        return awire.Message(id=self.id, model=self.body.model, content=content, stop_reason=reason[0],
                             stop_sequence=reason[1], usage=usage).model_dump(mode="json")

    async def result(self) -> dict[str, Any]:
        chat = await self.run.result()
        choice = chat["choices"][0]
        answer = choice["message"]
        content: list[dict[str, Any]] = []
        if answer.get("content"):
            content.append({"type": "text", "text": answer["content"]})
        for call in answer.get("tool_calls") or []:
            name = call["function"]["name"]
            content.append({"type": "tool_use", "id": tool_use_id(call["id"]), "name": name,
                            "input": _tool_input(name, call["function"]["arguments"])})
        usage = chat["usage"]
        return self.message(content, stop_reason(choice["finish_reason"], choice.get("stop_reason"),
                                                 self.body.stop_sequences),
                            awire.Usage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]))

    async def events(self) -> AsyncIterator[str]:
        gen = self.run.gens[0]
        input_tokens = len(gen.prompt_token_ids or ())
        yield event("message_start", message=self.message([], (None, None), awire.Usage(
            input_tokens=input_tokens, output_tokens=0)))
        yield event("ping")
        blocks = _Blocks()
        finish: ChoiceEvent | None = None
        try:
            async for e in self.run.events():
                if e.finish_reason is not None:
                    finish = e
                    continue
                for text in blocks.feed(e):
                    yield text
        except APIError as exc:
            yield event("error", error={"type": awire.ERROR_TYPES.get(exc.status_code, "api_error"),
                                        "message": exc.message})
            return
        for text in blocks.close():
            yield text
        reason = stop_reason(finish.finish_reason if finish else None, finish.stop_sequence if finish else None,
                             self.body.stop_sequences)
        usage = self.run.usage
        yield event("message_delta", delta={"stop_reason": reason[0], "stop_sequence": reason[1]},
                    usage={"input_tokens": usage.prompt_tokens if usage else input_tokens,
                           "output_tokens": usage.completion_tokens if usage else 0})
        yield event("message_stop")


class _Blocks:
    """The content blocks of a streamed message, opened and closed as the chat's pieces arrive."""

    def __init__(self) -> None:
        self.index = -1
        self.open: tuple[str, int | None] | None = None  # ("text", None) or ("tool_use", call index)

    def feed(self, e: ChoiceEvent) -> list[str]:
        out: list[str] = []
        if e.call_index is None:
            if not e.content:
                return out
            if self.open != ("text", None):
                out += self.close()
                out.append(self._start({"type": "text", "text": ""}, ("text", None)))
            out.append(event("content_block_delta", index=self.index, delta={"type": "text_delta",
                                                                              "text": e.content}))
            return out
        if self.open != ("tool_use", e.call_index):
            out += self.close()
            out.append(self._start({"type": "tool_use", "id": tool_use_id(e.call_id), "name": e.name or "",
                                    "input": {}}, ("tool_use", e.call_index)))
        if e.arguments:
            out.append(event("content_block_delta", index=self.index, delta={"type": "input_json_delta",
                                                                              "partial_json": e.arguments}))
        return out

    def _start(self, block: dict[str, Any], kind: tuple[str, int | None]) -> str:
        self.index += 1
        self.open = kind
        return event("content_block_start", index=self.index, content_block=block)

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", index=self.index)]


def event(kind: str, **fields: Any) -> str:
    """One Server-Sent Event of Anthropic's stream: its name, and a payload that repeats it as `type`."""
    return f"event: {kind}\ndata: {compact_json({'type': kind, **fields})}\n\n"


async def create_message(runtime: Runtime, body: awire.MessagesRequest, client: str | None = None) -> dict[str, Any]:
    """Run a validated Messages request to the end and return the `message` body (a batch line's answer)."""
    return await MessageRun(body, start_chat(runtime, chat_body(body, body.max_tokens), client, API)).result()


async def messages_reply(runtime: Runtime, raw: bytes, client: str) -> dict[str, Any] | AsyncIterator[str]:
    """An HTTP Messages request: validated, admitted and prepared (every 400, 429 and 503 before anything
    runs); the `message` body, or its events when it streams."""
    body = parse_body(raw, awire.MessagesRequest)
    chat = chat_body(body, body.max_tokens)
    runtime.admit(client)
    run = MessageRun(body, await runtime.off_loop(len(raw), start_chat, runtime, chat, client, API))
    return run.events() if body.stream else await run.result()


async def count_tokens(runtime: Runtime, raw: bytes, client: str) -> dict[str, Any]:
    """`{"input_tokens": N}`: the prompt the model would see for this conversation and these tools, counted by
    the engine's tokenizer; an engine that cannot count locally (an upstream) generates one token to learn it."""
    body = parse_body(raw, awire.CountTokensRequest)
    gen = chat_generations(runtime, chat_body(body, 1), client, API)[0]
    if gen.prompt_token_ids is not None:
        return {"input_tokens": len(gen.prompt_token_ids)}
    runtime.admit(client)
    return {"input_tokens": (await runtime.generate(gen)).prompt_tokens}
