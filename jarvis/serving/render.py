"""Shapes every OpenAI surface shares: usage, logprobs in both styles, Server-Sent Events, and the
merge of several generations' streams into one (n choices)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from pydantic import BaseModel

from jarvis import protocol as wire
from jarvis.engine import GenerationChunk, GenerationResult, PreparedRequest, TokenLogprob
from jarvis.errors import APIError

if TYPE_CHECKING:
    from jarvis.runtime import Runtime

_encode = msgspec.json.Encoder().encode
_encode_escaped = json.JSONEncoder(separators=(",", ":")).encode


def compact_json(value: Any) -> str:
    """Compact JSON, as every event is written: msgspec's encoder (0.2 against 1.9 us for a token's choices with
    the standard library's, paid by every streamed token), non-ASCII text as UTF-8 as OpenAI's and vLLM's servers
    write it. A string that UTF-8 cannot carry (a lone surrogate, which a JSON escape in a request can make) is
    written escaped by the standard library's encoder instead of failing the event."""
    try:
        return _encode(value).decode()
    except UnicodeEncodeError:
        return _encode_escaped(value)


def usage(prompt_tokens: int, completion_tokens: int) -> wire.Usage:
    return wire.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)


def chat_logprobs(entries: list[TokenLogprob]) -> wire.ChatLogprobs:
    return wire.ChatLogprobs(content=[
        wire.ChatTokenLogprob(token=e.token, logprob=e.logprob if e.logprob is not None else 0.0,
                              bytes=e.bytes, top_logprobs=[
                                  wire.TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                  for t, lp in e.top])
        for e in entries])


def completion_logprobs(result: GenerationResult, echo: bool, offset: int = 0) -> wire.CompletionLogprobs:
    entries = [*(result.prompt_logprobs or [])] if echo else []
    entries += result.logprobs
    out = wire.CompletionLogprobs()
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append(dict(e.top) if e.top else None)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else compact_json(payload)}\n\n"


class ChunkEvents:
    """The SSE events of one streamed response. Its chunks (`template`: one without choices) repeat every
    field but `choices`, and `usage` on the last, so the repeated fields are serialized once; an event
    serializes only its choices, given as plain dicts in the wire model's field order. Each event is the
    text `sse(wire.dump(chunk))` gives for the same chunk model, without a model built per token."""

    def __init__(self, template: BaseModel) -> None:
        self._fields = wire.dump(template)
        names = list(self._fields)
        at = names.index("choices")
        before = compact_json({name: self._fields[name] for name in names[:at]})
        after = compact_json({name: self._fields[name] for name in names[at + 1:]})
        self._open = f'data: {before[:-1]},"choices":'
        self._close = ("}" if after == "{}" else f",{after[1:]}") + "\n\n"

    def event(self, choices: list[dict[str, Any]]) -> str:
        """A chunk with these choices."""
        return f"{self._open}{compact_json(choices)}{self._close}"

    def usage_event(self, usage_: wire.Usage) -> str:
        """The chunk that ends a stream asked for usage: no choices, the usage of the whole stream."""
        return sse({**self._fields, "choices": [], "usage": wire.dump(usage_)})


async def stream_events(runtime: Runtime, gens: list[PreparedRequest], opening: list[str],
                        render: Callable[[int, GenerationChunk], str | None],
                        render_usage: Callable[[wire.Usage], str] | None) -> AsyncIterator[str]:
    """The SSE events of streamed generations: `opening`, one event per chunk worth sending (`render`
    returns None for the rest), the usage (prompt counted once, completions summed) when asked, [DONE].
    An error after the stream began is its last event, as vLLM's server sends it."""
    prompt_tokens, completion_tokens = 0, [0] * len(gens)
    try:
        for event in opening:
            yield event
        async for index, chunk in merged_streams(runtime, gens):
            rendered = render(index, chunk)
            if rendered is not None:
                yield rendered
            if chunk.finish_reason is not None:
                prompt_tokens = chunk.prompt_tokens or 0
                completion_tokens[index] = chunk.completion_tokens or 0
        if render_usage is not None:
            yield render_usage(usage(prompt_tokens, sum(completion_tokens)))
    except APIError as exc:
        yield sse(exc.to_body())
    yield sse("[DONE]")


async def merged_streams(runtime: Runtime, gens: list[PreparedRequest]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """(index, chunk) from every generation's stream as they come; one generation streams directly."""
    if len(gens) == 1:
        async for chunk in runtime.stream(gens[0]):
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, gen: PreparedRequest) -> None:
        try:
            async for chunk in runtime.stream(gen):
                await queue.put((index, chunk))
            await queue.put((index, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, gen)) for i, gen in enumerate(gens)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
