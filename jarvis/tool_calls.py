"""Tool calling, engine-neutral: how functions reach the prompt and how calls come back out of the text.

Three ways a call is read, all streaming-safe (text that may still turn out to be a call is held back,
never sent as content and then taken back):

* `JsonCallScanner`: decoding was constrained (`tool_choice` "required" or a named function) to call JSON
  (`call_schema`), so the output is the call: the named function's arguments object, or `{"name",
  "arguments"}` objects (an array of them when calls may be parallel). Arguments stream as generated.
* `TaggedCallParser`: free output where calls are `<tool_call>{"name": …, "arguments": …}</tool_call>`
  blocks (Hermes/Qwen templates, and Jarvis's own convention below); text around them is content.
* `TrailingJsonCallParser`: free output whose calls are one JSON text after a marker (Mistral's
  `[TOOL_CALLS][…]`) or that begins with a call object (Llama 3's JSON tool calling).

A chat format renders tools one of two ways. A format with `tool_prompt` (the `auto` format, when the
model's own template takes `tools`) gets the conversation in Hugging Face's tool shape. Any other format
gets Jarvis's convention (`convention_messages`): the functions described in the system message, earlier
calls as `<tool_call>` blocks in the assistant's turns, results as `<tool_response>` blocks in a user turn;
the format then renders plain messages, so every format (a third party's too) can serve tools.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from jarvis.engine import ToolCallDelta, ToolUse

Message = Mapping[str, Any]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser(Protocol):
    """Fed the generated text in pieces; gives back (content to show, tool-call pieces) for each."""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]: ...

    def finish(self) -> tuple[str, list[ToolCallDelta]]: ...


ParserFactory = Callable[[], ToolCallParser]


# --- the constraint --------------------------------------------------------------------------------


def parameters_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    """A function's `parameters`, or the schema of no arguments (OpenAI's default)."""
    return dict(function.get("parameters") or {"type": "object", "properties": {}})


def call_schema(tool_use: ToolUse) -> dict[str, Any]:
    """The JSON Schema decoding is constrained to when a call is required: the named function's
    arguments; else one `{"name", "arguments"}` object per call, `name` first (grammar engines emit
    properties in schema order, so a stream learns the name before the arguments)."""
    functions = {f["name"]: f for f in tool_use.tools}
    if tool_use.choice == "function":
        return parameters_schema(functions[tool_use.name or ""])
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters_schema(f)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, f in functions.items()]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": one, "minItems": 1} if tool_use.parallel else one


# --- rendering -------------------------------------------------------------------------------------


def describe_tools(tool_use: ToolUse) -> str:
    """The system-prompt text of Jarvis's convention: the functions and how to call them."""
    lines = [json.dumps({"name": f["name"], "description": f.get("description") or "",
                         "parameters": parameters_schema(f)}, ensure_ascii=False) for f in tool_use.tools]
    how_many = ("You may make several calls, one block each." if tool_use.parallel
                else "Make at most one call per answer.")
    return ("You can call functions to help answer. The functions, one JSON object each:\n"
            + "\n".join(lines)
            + f"\n\nTo call a function, answer with a {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} block holding a JSON "
              "object with the function's \"name\" and its \"arguments\" object, for example:\n"
              f"{TOOL_CALL_OPEN}\n{{\"name\": \"function_name\", \"arguments\": {{\"argument\": \"value\"}}}}\n"
              f"{TOOL_CALL_CLOSE}\n{how_many} Each result comes back in a "
              f"{TOOL_RESPONSE_OPEN}{TOOL_RESPONSE_CLOSE} block.")


def _arguments(raw: Any) -> Any:
    """A call's arguments as a value (OpenAI sends them as a JSON text)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def convention_messages(messages: Sequence[Message], tool_use: ToolUse | None) -> list[dict[str, str]]:
    """The conversation as plain {"role", "content"} messages in Jarvis's convention: any chat format
    renders it. Consecutive user turns (tool results, then a question) become one."""
    out: list[dict[str, str]] = []
    if tool_use is not None and tool_use.offered:
        description = describe_tools(tool_use)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0].get('content') or ''}\n\n{description}".strip()})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": description})
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"{TOOL_CALL_OPEN}\n" + json.dumps(
                {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))},
                ensure_ascii=False) + f"\n{TOOL_CALL_CLOSE}" for c in m["tool_calls"]]
            content = "\n".join(filter(None, [content, *blocks]))
        elif role == "tool":
            role, content = "user", f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
        if out and role == "user" and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{content}"}
        else:
            out.append({"role": role, "content": content})
    return out


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The conversation in the shape Hugging Face chat templates take: call arguments as values."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                "name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}}
                for c in m["tool_calls"]]
        out.append(m)
    return out


def uses_tools(messages: Sequence[Message]) -> bool:
    """The history holds calls or their results (it needs a tool-aware rendering even without `tools`)."""
    return any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


# --- parsing ---------------------------------------------------------------------------------------


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (and so must wait for more)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _read_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call object's text, or None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (value["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


class TaggedCallParser:
    """Calls in `open`…`close` blocks holding `{"name", "arguments"}`; everything else is content. A block
    that does not hold a call stays content. With `parallel` false, calls after the first are dropped."""

    def __init__(self, open_: str = TOOL_CALL_OPEN, close: str = TOOL_CALL_CLOSE, parallel: bool = True) -> None:
        self.open, self.close, self.parallel = open_, close, parallel
        self.buffer, self.inside, self.calls = "", False, 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self.buffer += text
        content, deltas = [], []
        while True:
            if not self.inside:
                at = self.buffer.find(self.open)
                if at < 0:
                    keep = _held_back(self.buffer, self.open)
                    content.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                content.append(self.buffer[:at])
                self.buffer, self.inside = self.buffer[at + len(self.open):], True
            else:
                end = self.buffer.find(self.close)
                if end < 0:
                    break
                block, self.buffer, self.inside = self.buffer[:end], self.buffer[end + len(self.close):], False
                call = _read_call(block.strip())
                if call is None:
                    content.append(self.open + block + self.close)
                elif self.parallel or self.calls == 0:
                    deltas.append(ToolCallDelta(self.calls, call_id(), call[0], call[1]))
                    self.calls += 1
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        rest = (self.open if self.inside else "") + self.buffer  # an unclosed block is text
        self.buffer, self.inside = "", False
        return rest, []


class TrailingJsonCallParser:
    """Calls as one JSON text (an object or an array of objects) after `marker` to the end of the output;
    with no marker, an output that begins with `{` is read as a call (Llama 3's JSON tool calling)."""

    def __init__(self, marker: str | None = None, parallel: bool = True) -> None:
        self.marker, self.parallel = marker, parallel
        self.buffer, self.holding, self.started = "", False, False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self.buffer += text
        if self.holding:
            return "", []
        if self.marker is None:
            stripped = self.buffer.lstrip()
            if not stripped:
                return "", []
            if not self.started and stripped.startswith("{"):
                self.holding = True
                return "", []
            self.started = True
            out, self.buffer = self.buffer, ""
            return out, []
        at = self.buffer.find(self.marker)
        if at >= 0:
            content, self.buffer, self.holding = self.buffer[:at], self.buffer[at + len(self.marker):], True
            return content, []
        keep = _held_back(self.buffer, self.marker)
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out, []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        text, self.buffer = self.buffer, ""
        if not self.holding:
            return text, []
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        items = value if isinstance(value, list) else [value]
        calls = [_read_call(json.dumps(item)) for item in items]
        if not items or any(c is None for c in calls):
            return (self.marker or "") + text, []
        calls = calls if self.parallel else calls[:1]
        return "", [ToolCallDelta(i, call_id(), name, args) for i, (name, args) in enumerate(calls)]  # type: ignore[misc]


class JsonCallScanner:
    """Reads constrained call JSON as it streams. With `name`, the whole output is that function's
    arguments; otherwise one `{"name", "arguments"}` object or an array of them, whose arguments are
    passed on piece by piece as soon as the call's name is known."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.started = False
        # the scanner of {"name", "arguments"} objects
        self.stack: list[str] = []
        self.in_string = self.escape = False
        self.string: list[str] = []
        self.string_role: str | None = None  # "key" or "name" while reading one of those strings
        self.expect: str | None = None  # the key whose value comes next in a call object
        self.awaiting_key = False  # in a call object, before a key's colon
        self.call_level = 0
        self.index = -1
        self.call_name: str | None = None
        self.held = ""  # arguments read before the name
        self.capture_at: int | None = None  # stack depth where the arguments value began
        self.arg_string = self.arg_escape = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self.name is not None:
            if not self.started:
                text = text.lstrip()
                if not text:
                    return "", []
                self.started = True
                return "", [ToolCallDelta(0, call_id(), self.name, text)]
            return "", [ToolCallDelta(0, arguments=text)] if text else []
        deltas: list[ToolCallDelta] = []
        piece: list[str] = []
        for c in text:
            if self.capture_at is not None:
                piece.append(c)
                if self._argument_char(c):
                    self._arguments_piece("".join(piece), deltas)
                    piece = []
                continue
            self._structure_char(c, deltas)
            if self.capture_at is not None:  # the arguments value began with this character
                piece.append(c)
        if piece:
            self._arguments_piece("".join(piece), deltas)
        return "", deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return "", []

    def _argument_char(self, c: str) -> bool:
        """Track the arguments value; True when `c` ended it."""
        if self.arg_string:
            if self.arg_escape:
                self.arg_escape = False
            elif c == "\\":
                self.arg_escape = True
            elif c == '"':
                self.arg_string = False
            return False
        if c == '"':
            self.arg_string = True
        elif c in "{[":
            self.stack.append(c)
        elif c in "}]":
            self.stack.pop()
            if len(self.stack) == self.capture_at:
                self.capture_at = None
                return True
        return False

    def _arguments_piece(self, piece: str, deltas: list[ToolCallDelta]) -> None:
        if self.call_name is None:
            self.held += piece
        else:
            deltas.append(ToolCallDelta(self.index, arguments=piece))

    def _structure_char(self, c: str, deltas: list[ToolCallDelta]) -> None:
        at_call = self.call_level > 0 and len(self.stack) == self.call_level
        if self.in_string:
            if self.escape:
                self.escape = False
                self.string.append(c)
            elif c == "\\":
                self.escape = True
                self.string.append(c)
            elif c == '"':
                self.in_string = False
                value = json.loads('"' + "".join(self.string) + '"')
                if self.string_role == "key":
                    self.expect = value
                elif self.string_role == "name":
                    self.call_name = value
                    deltas.append(ToolCallDelta(self.index, call_id(), value, self.held))
                    self.held = ""
            else:
                self.string.append(c)
        elif c == '"':
            self.in_string, self.string = True, []
            self.string_role = ("key" if at_call and self.awaiting_key else
                                "name" if at_call and self.expect == "name" else None)
        elif c in "{[":
            if at_call and self.expect == "arguments":
                self.capture_at = len(self.stack)
                self.stack.append(c)
                self.arg_string = self.arg_escape = False
                return
            self.stack.append(c)
            if not self.call_level:
                self.call_level = 1 if c == "{" else 2
            if len(self.stack) == self.call_level and c == "{":
                self.index += 1
                self.call_name, self.held, self.expect, self.awaiting_key = None, "", None, True
        elif c in "}]":
            if self.stack:
                self.stack.pop()
        elif at_call and c == ":":
            self.awaiting_key = False
        elif at_call and c == ",":
            self.expect, self.awaiting_key = None, True


def parser_for(tool_use: ToolUse, native: ParserFactory | None) -> ParserFactory:
    """The parser of a request's output: constrained JSON when a call is required, else the chat format's
    own (`native`) or Jarvis's `<tool_call>` convention."""
    if tool_use.choice == "function":
        return lambda: JsonCallScanner(tool_use.name)
    if tool_use.choice == "required":
        return JsonCallScanner
    if native is not None:
        return native
    return lambda: TaggedCallParser(parallel=tool_use.parallel)


def template_parser(template: str) -> ParserFactory:
    """The call syntax a model's own chat template teaches, recognised by its markers."""
    if "[TOOL_CALLS]" in template:
        return lambda: TrailingJsonCallParser("[TOOL_CALLS]")
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return lambda: TrailingJsonCallParser(None)
    return TaggedCallParser
