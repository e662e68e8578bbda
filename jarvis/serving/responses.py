"""The Responses API on the chat path: a `ResponsesRequest` → a chat completion → the response object or
its typed Server-Sent Events, stored for `previous_response_id`.

`prepare_response` parses the input items and tools item by item (an error names `input[i]...` or
`tools[i]...`), refuses what Jarvis cannot honour (built-in tools, `reasoning`, `include`,
`truncation: "auto"`, ...), rebuilds the conversation of `previous_response_id` from the store, and
starts the chat run, so every 400/404 comes before a byte is sent. `create_response` runs it to the end;
`response_events` streams it as OpenAI does:

    response.created, response.in_progress, then per output item:
      message:       output_item.added, content_part.added, output_text.delta..., output_text.done,
                     content_part.done, output_item.done
      function_call: output_item.added, function_call_arguments.delta..., function_call_arguments.done,
                     output_item.done
    and last response.completed, response.incomplete (max_output_tokens) or response.failed (an error).

Every event carries `type` and a `sequence_number`. A response is stored (unless `store: false`) before
its last event or its body is sent.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jarvis import protocol as wire
from jarvis import protocol_responses as rwire
from jarvis.auth import SINGLE_USER, Principal, visible
from jarvis.bodies import parse_body, validate_body
from jarvis.errors import APIError, InvalidRequest, NotFound
from jarvis.responses_store import ResponseStore, responses_store
from jarvis.serving.chat import ChatRun, start_chat
from jarvis.serving.render import compact_json

if TYPE_CHECKING:
    from jarvis.runtime import Runtime


@dataclass
class PreparedResponse:
    """A response whose request passed every check and whose chat run has started."""

    body: rwire.ResponsesRequest
    run: ChatRun
    context: list[dict[str, Any]]  # the conversation answered, earlier turns included, oldest first
    echo: dict[str, Any]  # the request fields a response object repeats
    store: ResponseStore | None
    owner: str | None  # who the stored response will belong to
    id: str = field(default_factory=lambda: rwire.new_id("resp"))
    created_at: int = field(default_factory=rwire.now)

    def response(self, status: str, output: list[dict[str, Any]], usage: wire.Usage | None = None,
                 error: APIError | None = None) -> dict[str, Any]:
        return rwire.dump(rwire.ResponseObject.model_validate(dict(
            id=self.id, created_at=self.created_at, status=status, model=self.run.model, output=output,
            completed_at=rwire.now() if status == "completed" else None,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            error={"code": error.code or error.error_type, "message": error.message} if error else None,
            usage=response_usage(usage) if usage is not None else None, **self.echo)))

    async def keep(self, response: dict[str, Any]) -> dict[str, Any]:
        """Store the response (unless `store: false`) before the client sees it, on the store's thread."""
        if self.store is not None:
            await self.store.run(self.store.save, response, self.context, self.owner)
        return response


def response_usage(usage: wire.Usage) -> rwire.ResponseUsage:
    return rwire.ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                               total_tokens=usage.prompt_tokens + usage.completion_tokens)


# --- request → chat ------------------------------------------------------------------------------------


def _unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def _texts(parts: Any, where: str, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    """Content parts, as stored: text parts only (Jarvis serves a text model)."""
    if isinstance(parts, str):
        return [{"type": allowed[0], "text": parts}]
    if not isinstance(parts, list):
        raise InvalidRequest(f"Invalid value for '{where}': expected a string or a list of content parts.",
                             param=where, code="invalid_value")
    out = []
    for j, raw in enumerate(parts):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in allowed:
            raise InvalidRequest(
                f"Invalid value for '{where}[{j}].type': {kind!r}. Supported here: {', '.join(allowed)}"
                + (" (Jarvis serves a text model: images, files and audio are not supported)."
                   if isinstance(kind, str) and kind.startswith("input_") else "."),
                param=f"{where}[{j}].type", code="invalid_value")
        part = validate_body(raw, rwire.InputText, f"{where}[{j}]")
        out.append({"type": part.type, "text": part.text, **({"annotations": []} if part.type == "output_text"
                                                             else {})})
    return out


def input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's `input` as stored items (each with an id and status), checked one by one."""
    if isinstance(raw, str):
        return [{"type": "message", "id": rwire.new_id("msg"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": raw}]}]
    items = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            msg = validate_body(item, rwire.MessageItem, where)
            allowed = ("output_text",) if msg.role == "assistant" else ("input_text",)
            content = _texts(msg.content, f"{where}.content", allowed)
            items.append({"type": "message", "id": msg.id or rwire.new_id("msg"), "role": msg.role,
                          "status": "completed", "content": content})
        elif kind == "function_call":
            call = validate_body(item, rwire.FunctionCallItem, where)
            items.append({"type": "function_call", "id": call.id or rwire.new_id("fc"), "call_id": call.call_id,
                          "name": call.name, "arguments": call.arguments, "status": "completed"})
        elif kind == "function_call_output":
            out = validate_body(item, rwire.FunctionCallOutputItem, where)
            text = out.output if isinstance(out.output, str) else "".join(
                p["text"] for p in _texts(out.output, f"{where}.output", ("input_text",)))
            items.append({"type": "function_call_output", "id": out.id or rwire.new_id("fco"),
                          "call_id": out.call_id, "output": text, "status": "completed"})
        else:
            raise InvalidRequest(
                f"Invalid value for '{where}.type': {kind!r}. Jarvis takes message, function_call and "
                "function_call_output items (no built-in tool calls, reasoning or item references).",
                param=f"{where}.type", code="invalid_value")
    return items


def chat_messages(instructions: str | None, items: list[dict[str, Any]], first_new: int) -> list[dict[str, Any]]:
    """The conversation in chat's shape: instructions as the system message, parallel calls in one
    assistant message, outputs as tool messages. `first_new`: where this request's input begins (errors
    name `input[i]` from there on)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    calls: set[str] = set()
    for position, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            messages.append({"role": item["role"], "content": "".join(p["text"] for p in item["content"])})
        elif kind == "function_call":
            calls.add(item["call_id"])
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if item["call_id"] not in calls:
                where = f"input[{position - first_new}].call_id" if position >= first_new else "previous_response_id"
                raise InvalidRequest(f"No tool call found for function call output with call_id "
                                     f"{item['call_id']!r}.", param=where, code="invalid_value")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def function_tools(raw: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The tools as a response echoes them (flat function shape, strict defaulting to true)."""
    tools: list[dict[str, Any]] = []
    for i, item in enumerate(raw or []):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind != "function":
            what = ("is a built-in tool OpenAI runs itself; Jarvis runs none (web search, file search, computer "
                    "use, code interpreter, image generation, MCP, shell)" if kind in rwire.BUILT_IN_TOOLS
                    else "is not a tool type Jarvis knows")
            raise _unsupported(f"tools[{i}].type", f"tools[{i}].type {kind!r} {what}. Declare a function tool "
                               '({"type": "function", "name", "parameters"}) and run it in your code.')
        tool = validate_body(item, rwire.FunctionToolParam, f"tools[{i}]")
        if any(t["name"] == tool.name for t in tools):
            raise InvalidRequest(f"tools[{i}].name {tool.name!r} is declared twice.", param=f"tools[{i}].name",
                                 code="invalid_value")
        tools.append({"type": "function", "name": tool.name, "description": tool.description,
                      "parameters": tool.parameters, "strict": True if tool.strict is None else tool.strict})
    return tools


def tool_choice(raw: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> tuple[Any, Any, list[str]]:
    """(the echo, chat's tool_choice, the names of the tools the model may call)."""
    names = [t["name"] for t in tools]
    if raw is None:
        return "auto", None, names
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise InvalidRequest(f"Invalid value for 'tool_choice': {raw!r}; use none, auto, required, "
                                 '{"type": "function", "name"} or {"type": "allowed_tools", ...}.',
                                 param="tool_choice", code="invalid_value")
        if raw == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs tools.", param="tool_choice", code="invalid_value")
        return raw, raw, names
    kind = raw.get("type")
    if kind == "function":
        unknown = sorted(set(raw) - {"type", "name"})
        if unknown:
            raise InvalidRequest(f"Unrecognized request argument supplied: tool_choice.{unknown[0]}.",
                                 param=f"tool_choice.{unknown[0]}", code="unrecognized_argument")
        name = raw.get("name")
        if name not in names:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not among tools "
                                 f"({', '.join(names) or 'none declared'}).", param="tool_choice.name",
                                 code="invalid_value")
        return {"type": "function", "name": name}, {"type": "function", "function": {"name": name}}, names
    if kind == "allowed_tools":
        unknown = sorted(set(raw) - {"type", "mode", "tools"})
        if unknown:
            raise InvalidRequest(f"Unrecognized request argument supplied: tool_choice.{unknown[0]}.",
                                 param=f"tool_choice.{unknown[0]}", code="unrecognized_argument")
        mode, allowed = raw.get("mode"), raw.get("tools")
        if mode not in ("auto", "required"):
            raise InvalidRequest("tool_choice.mode must be auto or required.", param="tool_choice.mode",
                                 code="invalid_value")
        if not isinstance(allowed, list) or not allowed:
            raise InvalidRequest("tool_choice.tools must list the allowed tools.", param="tool_choice.tools",
                                 code="invalid_value")
        subset = []
        for j, ref in enumerate(allowed):
            if not isinstance(ref, dict) or ref.get("type") != "function" or ref.get("name") not in names:
                raise InvalidRequest(f"tool_choice.tools[{j}] must be {{\"type\": \"function\", \"name\"}} naming "
                                     f"one of tools ({', '.join(names) or 'none declared'}).",
                                     param=f"tool_choice.tools[{j}]", code="invalid_value")
            subset.append(ref["name"])
        return raw, mode, subset
    raise _unsupported("tool_choice.type", f"tool_choice.type {kind!r} is not supported: Jarvis has function "
                                           "tools only (none, auto, required, function, allowed_tools).")


def text_format(text: rwire.TextConfig | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the `text` echo, chat's response_format)."""
    if text is not None and text.verbosity is not None:
        raise _unsupported("text.verbosity", "text.verbosity is not supported (it tunes OpenAI's reasoning "
                                             "models); omit it.")
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return {"format": {"type": "text"}}, None
    if fmt.type == "json_object":
        return {"format": {"type": "json_object"}}, {"type": "json_object"}
    if not fmt.name:
        raise InvalidRequest("text.format of type json_schema needs a name.", param="text.format.name",
                             code="invalid_value")
    if fmt.schema_ is None:
        raise InvalidRequest("text.format of type json_schema needs a schema.", param="text.format.schema",
                             code="invalid_value")
    echo = {"type": "json_schema", "name": fmt.name, "schema": fmt.schema_, "description": fmt.description,
            "strict": fmt.strict}
    spec = {"name": fmt.name, "schema": fmt.schema_, **({"description": fmt.description} if fmt.description else {}),
            **({"strict": fmt.strict} if fmt.strict is not None else {})}
    return {"format": echo}, {"type": "json_schema", "json_schema": spec}


def refuse_unsupported(body: rwire.ResponsesRequest) -> None:
    """A known OpenAI field that would change the answer and that Jarvis cannot honour: a 400 naming it."""
    if body.include:
        raise _unsupported("include", f"include {body.include!r} is not supported: Jarvis has no extra output "
                                      "to include (no reasoning, logprobs or built-in tool results); omit it.")
    if body.reasoning is not None:
        raise _unsupported("reasoning", "reasoning is not supported: the served model is not a reasoning model; "
                                        "omit it.")
    if body.truncation == "auto":
        raise _unsupported("truncation", "truncation 'auto' is not supported: Jarvis never drops input items; "
                                         "a conversation over the context window is a 400. Use 'disabled'.")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "top_logprobs is not supported on /v1/responses; use "
                                           "/v1/chat/completions with logprobs.")
    if body.background:
        raise _unsupported("background", "background responses are not supported; set background false.")
    if body.conversation is not None:
        raise _unsupported("conversation", "conversation is not supported; use previous_response_id.")
    if body.prompt is not None:
        raise _unsupported("prompt", "prompt templates are not supported; send input and instructions.")


def chat_request(body: rwire.ResponsesRequest, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                 chat_choice: Any, response_format: dict[str, Any] | None) -> wire.ChatCompletionRequest:
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    optional = {"max_completion_tokens": body.max_output_tokens, "temperature": body.temperature,
                "top_p": body.top_p, "response_format": response_format, "user": body.user,
                "tool_choice": chat_choice, "parallel_tool_calls": body.parallel_tool_calls if tools else None}
    chat.update({k: v for k, v in optional.items() if v is not None})
    if tools:
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type" and v is not None}}
                         for t in tools]
    return validate_body(chat, wire.ChatCompletionRequest)


def responses_error(exc: APIError, tool_positions: list[int]) -> APIError:
    """An error of the chat path, its `param` named as the Responses API names it: `max_tokens` is
    `max_output_tokens`, `response_format` is `text.format`, `tools.0.function.parameters` is
    `tools[i].parameters` (i: the tool's place in the request), a message is somewhere in `input`."""
    param = exc.param or ""
    head, _, rest = param.partition(".")
    if head == "tools" and rest.split(".")[0].isdigit():
        index, _, inner = rest.partition(".")
        inner = inner.removeprefix("function").lstrip(".")
        position = tool_positions[int(index)] if int(index) < len(tool_positions) else int(index)
        renamed = f"tools[{position}]" + (f".{inner}" if inner else "")
    elif head in ("max_tokens", "max_completion_tokens"):
        renamed = "max_output_tokens"
    elif head == "response_format":
        renamed = "text.format" + (f".{rest}" if rest else "")
    elif head == "messages":
        renamed = "input"
    else:
        return exc
    exc.param = renamed
    if param != "messages":  # a bare "messages" may be a word of the message
        exc.message = exc.message.replace(param, renamed, 1)
    exc.message = exc.message.replace("max_completion_tokens", "max_output_tokens").replace(
        "max_tokens", "max_output_tokens")
    return exc


async def prepare_response(runtime: Runtime, body: rwire.ResponsesRequest, client: str | None = None,
                           store: ResponseStore | None = None, viewer: Principal = SINGLE_USER) -> PreparedResponse:
    """Check everything, rebuild the conversation (of a response `viewer` may see) and start the chat run;
    raises the 400/404 first."""
    refuse_unsupported(body)
    store = store or responses_store(runtime.settings.state_path)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        found = await store.run(store.find, body.previous_response_id)
        if found is None or not visible(viewer, found.owner, "previous_response_id", body.previous_response_id):
            raise NotFound(f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = found.conversation()
    new = input_items(body.input)
    context = [*history, *new]
    messages = chat_messages(body.instructions, context, len(history))
    if not any(m["role"] != "system" for m in messages):
        raise InvalidRequest("input has no message to answer: send a string or at least one item.",
                             param="input", code="invalid_value")
    tools = function_tools(body.tools)
    choice_echo, chat_choice, allowed = tool_choice(body.tool_choice, tools)
    text_echo, response_format = text_format(body.text)
    positions = [i for i, t in enumerate(tools) if t["name"] in allowed]
    try:
        chat = chat_request(body, messages, [tools[i] for i in positions], chat_choice, response_format)
        size = sum(len(str(m.get("content") or "")) for m in messages)  # the stored history's text included
        run = await runtime.off_loop(size, start_chat, runtime, chat, client)
    except APIError as exc:
        raise responses_error(exc, positions) from None
    echo = {"instructions": body.instructions, "previous_response_id": body.previous_response_id,
            "tools": tools, "tool_choice": choice_echo,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "max_tool_calls": body.max_tool_calls,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "max_output_tokens": body.max_output_tokens,
            "text": text_echo, "store": body.store, "metadata": body.metadata or {}, "user": body.user}
    return PreparedResponse(body=body, run=run, context=context, echo=echo, store=store if body.store else None,
                            owner=viewer.owner)


# --- chat → response -----------------------------------------------------------------------------------


def output_items(message: dict[str, Any], finish_reason: str | None) -> list[dict[str, Any]]:
    """A chat message as output items: its text as a message, each tool call as a function_call."""
    items: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        items.append({"type": "message", "id": rwire.new_id("msg"), "role": "assistant", "status": "completed",
                      "content": [output_text(message.get("content") or "")]})
    for call in calls:
        items.append({"type": "function_call", "id": rwire.new_id("fc"), "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    if finish_reason == "length":
        items[-1]["status"] = "incomplete"
    return items


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


async def create_response(runtime: Runtime, body: rwire.ResponsesRequest, client: str | None = None,
                          store: ResponseStore | None = None, viewer: Principal = SINGLE_USER) -> dict[str, Any]:
    """Run a response to the end (stored unless `store: false`, owned by `viewer`) and return the response
    object."""
    prepared = await prepare_response(runtime, body, client, store, viewer)
    return await finish_response(prepared)


async def finish_response(prepared: PreparedResponse) -> dict[str, Any]:
    result = await prepared.run.result()
    choice = result["choices"][0]
    usage = wire.Usage.model_validate(result["usage"])
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    return await prepared.keep(prepared.response(status, output_items(choice["message"], choice["finish_reason"]),
                                                 usage))


def sse_event(kind: str, sequence: int, **fields: Any) -> str:
    return f"event: {kind}\ndata: {compact_json({'type': kind, 'sequence_number': sequence, **fields})}\n\n"


async def response_events(prepared: PreparedResponse) -> AsyncIterator[str]:
    """The typed SSE events of a streamed response (see the module docstring for their order)."""
    sequence = itertools.count()
    output: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None  # the item being streamed
    call_index: int | None = None

    def event(kind: str, **fields: Any) -> str:
        return sse_event(kind, next(sequence), **fields)

    def open_message() -> list[str]:
        nonlocal current
        current = {"type": "message", "id": rwire.new_id("msg"), "role": "assistant", "status": "in_progress",
                   "content": []}
        index = len(output)
        return [event("response.output_item.added", output_index=index, item=current),
                event("response.content_part.added", output_index=index, item_id=current["id"], content_index=0,
                      part=output_text(""))]

    def open_call(call_id: str | None, name: str | None) -> list[str]:
        nonlocal current
        current = {"type": "function_call", "id": rwire.new_id("fc"), "call_id": call_id or rwire.new_id("call"),
                   "name": name or "", "arguments": "", "status": "in_progress"}
        return [event("response.output_item.added", output_index=len(output), item=dict(current))]

    def close(status: str) -> list[str]:
        nonlocal current
        item, current = current, None
        if item is None:
            return []
        index, events = len(output), []
        if item["type"] == "message":
            text = "".join(item.pop("text", []))
            part = output_text(text)
            events += [event("response.output_text.done", output_index=index, item_id=item["id"], content_index=0,
                             text=text, logprobs=[]),
                       event("response.content_part.done", output_index=index, item_id=item["id"],
                             content_index=0, part=part)]
            item["content"] = [part]
        else:
            events.append(event("response.function_call_arguments.done", output_index=index, item_id=item["id"],
                                arguments=item["arguments"]))
        item["status"] = status
        output.append(item)
        return [*events, event("response.output_item.done", output_index=index, item=item)]

    def text_delta(text: str) -> list[str]:
        opening = [] if current is not None and current["type"] == "message" else [*close("completed"),
                                                                                    *open_message()]
        message: dict[str, Any] = current  # type: ignore[assignment]
        message.setdefault("text", []).append(text)
        return [*opening, event("response.output_text.delta", output_index=len(output), item_id=message["id"],
                                content_index=0, delta=text, logprobs=[])]

    held = ""  # trailing whitespace not sent yet
    yield event("response.created", response=prepared.response("in_progress", []))
    yield event("response.in_progress", response=prepared.response("in_progress", []))
    finish_reason = None
    try:
        async for piece in prepared.run.events():
            if piece.index != 0:
                continue
            if piece.content:
                held += piece.content
                text = held.rstrip()  # whitespace waits: an answer that ends in calls has its text stripped
                if text:
                    for e in text_delta(text):
                        yield e
                    held = held[len(text):]
            if piece.call_index is not None:
                if current is None or current["type"] != "function_call" or piece.call_index != call_index:
                    call_index, held = piece.call_index, ""
                    for e in [*close("completed"), *open_call(piece.call_id, piece.name)]:
                        yield e
                if piece.arguments:
                    current["arguments"] += piece.arguments  # type: ignore[index]
                    yield event("response.function_call_arguments.delta", output_index=len(output),
                                item_id=current["id"], delta=piece.arguments)  # type: ignore[index]
            if piece.finish_reason is not None:
                finish_reason = piece.finish_reason
        status = "incomplete" if finish_reason == "length" else "completed"
        if held and not any(item["type"] == "function_call" for item in output) and (
                current is None or current["type"] == "message"):
            for e in text_delta(held):
                yield e
        if current is None and not output:  # no text and no call: an empty message, as non-streamed
            for e in open_message():
                yield e
        for e in close(status):
            yield e
        final = await prepared.keep(prepared.response(status, output, prepared.run.usage))
        yield event(f"response.{status}", response=final)
    except APIError as exc:
        failed = await prepared.keep(prepared.response("failed", [], error=exc))
        yield event("response.failed", response=failed)


async def response_reply(runtime: Runtime, raw: bytes, client: str, store: ResponseStore | None,
                         viewer: Principal = SINGLE_USER) -> dict[str, Any] | AsyncIterator[str]:
    """An HTTP `POST /v1/responses` by `viewer`: validated, admitted and prepared before anything runs; the
    response object, or its typed SSE events when it streams."""
    body = parse_body(raw, rwire.ResponsesRequest)
    runtime.admit(client)
    prepared = await prepare_response(runtime, body, client, store, viewer)
    if body.stream:
        return response_events(prepared)
    return await finish_response(prepared)
