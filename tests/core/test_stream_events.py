"""Streamed SSE events are the wire models' text: `ChunkEvents` serializes plain dicts, once per token, and
must send byte for byte what `sse(wire.dump(model))` of the pydantic chunk models sends.

The oracles below render the same generation chunks through the pydantic models in `jarvis.protocol`
(`ChatCompletionChunk`, `Completion`); a scripted runtime (the engine is not the subject) streams the
chunks: text with quotes, escapes and non-ASCII characters, tool-call pieces, logprobs, echo, the finish
and the usage chunk.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest

from jarvis import protocol as wire
from jarvis.engine import GenerationChunk, GenerationResult, PreparedRequest, TokenLogprob, ToolCallDelta
from jarvis.serving.chat import ChatRun
from jarvis.serving.completions import completion_events
from jarvis.serving.render import ChunkEvents, chat_logprobs, completion_logprobs, sse, usage

ID, NOW, MODEL = "id-0123456789", 1_700_000_000, "gemma-3-270m"
TEXT = 'Hé "quoted" \\ back\nslash\ttab 😀 <end>'


class ScriptedRuntime:
    """Streams the same chunks for every generation (fresh copies: the stream's consumers may edit them)."""

    def __init__(self, chunks: list[GenerationChunk]) -> None:
        self.chunks = chunks

    async def stream(self, gen: PreparedRequest):
        for chunk in self.chunks:
            yield replace(chunk, logprobs=list(chunk.logprobs), tool_calls=list(chunk.tool_calls))


@pytest.fixture(autouse=True)
def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "new_id", lambda prefix: f"{prefix}-{ID}")
    monkeypatch.setattr(wire, "now", lambda: NOW)


def collect(events: Any) -> list[str]:
    async def run() -> list[str]:
        return [event async for event in events]
    return asyncio.run(run())


def logprob(token: str, value: float) -> TokenLogprob:
    return TokenLogprob(token, value, list(token.encode()), [(token, value), ("other", value - 1.5)])


CHAT_CHUNKS = [
    GenerationChunk(text=TEXT, token_count=3),
    GenerationChunk(text=" more", token_count=1, logprobs=[logprob(" more", -0.25)]),
    GenerationChunk(text="", token_count=1),  # a token whose text is held back: an event with content ""
    GenerationChunk(text="", token_count=1, logprobs=[logprob("", float("-inf"))]),
    GenerationChunk(text="", token_count=4, tool_calls=[ToolCallDelta(0, "call_1", "get_weather", '{"city": ')]),
    GenerationChunk(text="", token_count=2, tool_calls=[ToolCallDelta(0, arguments='"Zürich"}'),
                                                        ToolCallDelta(1, "call_2", "get_time", "{}")],
                    logprobs=[logprob("}", -0.5)]),
    GenerationChunk(text="!", token_count=1, finish_reason="tool_calls", prompt_tokens=7, completion_tokens=12),
]


def pydantic_chat_events(chunks: list[GenerationChunk], include_usage: bool, logprobs: bool) -> list[str]:
    """The events of one choice as the pydantic chunk models render them."""
    def event(choices: list[wire.ChatChunkChoice], usage_: wire.Usage | None = None) -> str:
        return sse(wire.dump(wire.ChatCompletionChunk(id=f"chatcmpl-{ID}", created=NOW, model=MODEL,
                                                      choices=choices, usage=usage_)))

    out = [event([wire.ChatChunkChoice(index=0, delta=wire.ChatDelta(role="assistant", content=""))])]
    for chunk in chunks:
        tokens_only = chunk.token_count > 0 and not chunk.tool_calls and chunk.finish_reason is None
        content = chunk.text or tokens_only or (chunk.logprobs and not chunk.tool_calls)
        pieces: list[list[Any]] = [[wire.ChatDelta(content=chunk.text), None]] if content else []
        for d in chunk.tool_calls:
            call: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
            if d.id is not None:
                call.update(id=d.id, type="function")
                call["function"]["name"] = d.name
            pieces.append([wire.ChatDelta(tool_calls=[call]), None])
        if chunk.logprobs:
            pieces = pieces or [[wire.ChatDelta(), None]]
            pieces[0][1] = chat_logprobs(chunk.logprobs) if logprobs else None
        if chunk.finish_reason is not None:
            pieces.append([wire.ChatDelta(), None, chunk.finish_reason])
        out += [event([wire.ChatChunkChoice(index=0, delta=p[0], logprobs=p[1], finish_reason=p[2] if len(p) > 2
                                            else None)]) for p in pieces]
    if include_usage:
        last = chunks[-1]
        out.append(event([], usage(last.prompt_tokens or 0, last.completion_tokens or 0)))
    return [*out, sse("[DONE]")]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("logprobs", [False, True])
def test_chat_events_are_the_chunk_models_text(include_usage: bool, logprobs: bool) -> None:
    body = wire.ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=logprobs)
    run = ChatRun(ScriptedRuntime(CHAT_CHUNKS), body, [PreparedRequest(prompt="p", model=MODEL, kind="chat")])
    assert collect(run.sse(include_usage)) == pydantic_chat_events(CHAT_CHUNKS, include_usage, logprobs)


def test_chat_events_keep_every_piece_of_a_chunk() -> None:
    body = wire.ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    run = ChatRun(ScriptedRuntime(CHAT_CHUNKS), body, [PreparedRequest(prompt="p", model=MODEL, kind="chat")])
    pieces = collect(run.events())
    assert [(p.content, p.call_index, p.call_id, p.arguments, p.finish_reason, len(p.logprobs)) for p in pieces] == [
        (TEXT, None, None, "", None, 0), (" more", None, None, "", None, 1), ("", None, None, "", None, 0),
        ("", None, None, "", None, 1),
        ("", 0, "call_1", '{"city": ', None, 0), ("", 0, None, '"Zürich"}', None, 1),
        ("", 1, "call_2", "{}", None, 0), ("!", None, None, "", None, 0), ("", None, None, "", "tool_calls", 0)]
    assert run.usage == usage(7, 12)


COMPLETION_CHUNKS = [
    GenerationChunk(text=TEXT, token_count=2, logprobs=[logprob("Hé", -0.1), logprob(' "quoted"', -2.0)],
                    prompt_logprobs=[TokenLogprob("<bos>", None), logprob("Say", -3.0)]),
    GenerationChunk(text="", token_count=1),  # a token whose text is held back: an event with text ""
    GenerationChunk(text=" end", token_count=1, logprobs=[logprob(" end", -0.75)]),
    GenerationChunk(text="", finish_reason="length", prompt_tokens=2, completion_tokens=4),
]


def pydantic_completion_events(gen: PreparedRequest, include_usage: bool) -> list[str]:
    """The events of one choice as the pydantic `Completion` model renders them."""
    def event(choices: list[wire.CompletionChoice], usage_: wire.Usage | None = None) -> str:
        return sse(wire.dump(wire.Completion(id=f"cmpl-{ID}", created=NOW, model=MODEL, choices=choices,
                                             usage=usage_)))

    out, offset, echoed = [], 0, False
    for chunk in COMPLETION_CHUNKS:
        if not (chunk.text or chunk.token_count or chunk.logprobs or chunk.finish_reason or chunk.prompt_logprobs):
            continue
        text, entries = chunk.text, list(chunk.logprobs)
        if gen.echo and not echoed:
            echoed, text = True, (gen.prompt or "") + text
            entries = [*(chunk.prompt_logprobs or []), *entries]
        logprobs = None
        if gen.logprobs:
            logprobs = completion_logprobs(GenerationResult("", "stop", 0, 0, logprobs=entries), echo=False,
                                           offset=offset)
            offset += sum(len(e.token) for e in entries)
        out.append(event([wire.CompletionChoice(index=0, text=text, finish_reason=chunk.finish_reason,
                                                logprobs=logprobs)]))
    if include_usage:
        out.append(event([], usage(2, 4)))
    return [*out, sse("[DONE]")]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("echo, logprobs", [(False, False), (False, True), (True, True), (True, False)])
def test_completion_events_are_the_completion_models_text(include_usage: bool, echo: bool, logprobs: bool) -> None:
    gen = PreparedRequest(prompt="<bos>Say", model=MODEL, echo=echo, logprobs=logprobs, top_logprobs=2)
    events = completion_events(ScriptedRuntime(COMPLETION_CHUNKS), [gen], include_usage)
    assert collect(events) == pydantic_completion_events(gen, include_usage)


@pytest.mark.parametrize("template", [
    wire.ChatCompletionChunk(id="chatcmpl-1", created=NOW, model=MODEL, choices=[]),
    wire.Completion(id="cmpl-1", created=NOW, model="a \"quoted\" model ü", choices=[]),
])
def test_chunk_events_serialize_the_template_around_the_choices(template: Any) -> None:
    events = ChunkEvents(template)
    choices = [{"index": 0, "text": TEXT, "nested": {"list": [1, 2.5, None, True]}}]
    assert events.event(choices) == sse({**wire.dump(template), "choices": choices})
    assert events.usage_event(usage(3, 4)) == sse(wire.dump(template.model_copy(update={"usage": usage(3, 4)})))


def test_events_write_text_as_utf8_and_a_lone_surrogate_escaped() -> None:
    """Non-ASCII text goes out as UTF-8, as OpenAI's and vLLM's servers write it; a lone surrogate (which a JSON
    escape in a request can carry into echoed text) cannot be UTF-8, so that event is escaped JSON instead of an
    error in the middle of a stream."""
    plain = sse({"text": TEXT})
    assert "Hé" in plain and "😀" in plain and "\\u" not in plain
    assert json.loads(plain.removeprefix("data: ")) == {"text": TEXT}
    broken = sse({"text": "a\udc80b"})
    assert broken == 'data: {"text":"a\\udc80b"}\n\n'
    assert json.loads(broken.removeprefix("data: ")) == {"text": "a\udc80b"}
