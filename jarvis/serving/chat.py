"""Chat completions: a `ChatCompletionRequest` → n generations → the OpenAI response or its SSE events.

`start_chat` validates and prepares a request (every 400 comes before anything runs) and returns a
`ChatRun`; its `result()` is the `chat.completion` body, its `events()` the choices' pieces as they come
(`ChoiceEvent`: content, tool-call pieces, the finish), which `sse()` renders as OpenAI's chunks and the
Responses API as its own typed events. Tool calls arrive already read out of the text (the runtime parses
them, or an engine that handles tools returns them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jarvis import protocol as wire
from jarvis.bodies import parse_body
from jarvis.engine import (
    GenerationRequest,
    GenerationResult,
    PreparedRequest,
    RequestContext,
    TokenLogprob,
    ToolCallDelta,
)
from jarvis.errors import APIError
from jarvis.serving.render import ChunkEvents, chat_logprobs, merged_streams, sse, usage
from jarvis.serving.requests import choice_seed, generation_options, tool_use, turn_options

if TYPE_CHECKING:
    from jarvis.runtime import Runtime


@dataclass(frozen=True)
class ChoiceEvent:
    """One piece of one choice of a streamed chat: `content` (assistant text), or a piece of tool call
    `call_index` (its first piece carries `call_id` and `name`, later ones more `arguments`); the choice's
    last event carries `finish_reason`."""

    index: int
    content: str = ""
    call_index: int | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: With `finish_reason`: the stop string that ended the choice, when one did.
    stop_sequence: str | None = None


def chat_generations(runtime: Runtime, body: wire.ChatCompletionRequest, client: str | None = None,
                     api: str = "openai") -> list[PreparedRequest]:
    """One prepared generation per choice (n), each with its own seed when the body has one; `api`: the wire
    API that asked (a translation onto chat names its own)."""
    first = runtime.prepare(GenerationRequest(
        prompt=None, model=body.model, kind="chat", context=RequestContext(client=client, api=api),
        messages=[m.normalised() for m in body.messages], max_tokens=body.token_limit,
        logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, tool_use=tool_use(body),
        **turn_options(body), **generation_options(body)))
    return [first, *(first.for_choice(i, choice_seed(body.seed, i)) for i in range(1, body.n))]


def start_chat(runtime: Runtime, body: wire.ChatCompletionRequest, client: str | None = None,
               api: str = "openai") -> ChatRun:
    return ChatRun(runtime, body, chat_generations(runtime, body, client, api))


class ChatRun:
    """A prepared chat completion: run it whole (`result`) or as it streams (`events`, `sse`)."""

    def __init__(self, runtime: Runtime, body: wire.ChatCompletionRequest, gens: list[PreparedRequest]) -> None:
        self.runtime, self.body, self.gens = runtime, body, gens
        self.model = body.model
        #: Set when `events()` ends: the prompt counted once, every choice's completion tokens summed.
        self.usage: wire.Usage | None = None

    async def result(self) -> dict[str, Any]:
        """Every choice, concurrently, to the end: the OpenAI `chat.completion` body."""
        results = await asyncio.gather(*(self.runtime.generate(gen) for gen in self.gens))
        self.usage = usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
        return wire.dump(wire.ChatCompletion(
            id=wire.new_id("chatcmpl"), created=wire.now(), model=self.model,
            choices=[wire.ChatChoice(index=i, message=assistant_message(r), finish_reason=r.finish_reason,
                                     logprobs=chat_logprobs(r.logprobs) if self.body.logprobs else None,
                                     stop_reason=r.stop_sequence)
                     for i, r in enumerate(results)],
            usage=self.usage))

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        prompt_tokens, completion_tokens = 0, [0] * len(self.gens)
        async for index, chunk in merged_streams(self.runtime, self.gens):
            logprobs = chunk.logprobs  # they go with the chunk's first piece
            # generated tokens whose text is held back are an event too (content ""), as vLLM's server streams
            # one per engine step; the last chunk's tokens go with its finish event
            held_back = chunk.token_count > 0 and chunk.finish_reason is None
            if chunk.text or (not chunk.tool_calls and (logprobs or held_back)):
                yield ChoiceEvent(index, content=chunk.text, logprobs=logprobs)
                logprobs = []
            for d in chunk.tool_calls:
                yield ChoiceEvent(index, call_index=d.index, call_id=d.id, name=d.name, arguments=d.arguments,
                                  logprobs=logprobs)
                logprobs = []
            if chunk.finish_reason is not None:
                prompt_tokens = chunk.prompt_tokens or 0
                completion_tokens[index] = chunk.completion_tokens or 0
                yield ChoiceEvent(index, finish_reason=chunk.finish_reason, stop_sequence=chunk.stop_sequence)
        self.usage = usage(prompt_tokens, sum(completion_tokens))

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        """OpenAI's `chat.completion.chunk` events; every choice opens with the role. An error after the
        stream began is its last event, as vLLM's server sends it."""
        events = ChunkEvents(wire.ChatCompletionChunk(id=wire.new_id("chatcmpl"), created=wire.now(),
                                                      model=self.model, choices=[]))
        want_logprobs = self.body.logprobs
        try:
            for i in range(len(self.gens)):
                yield events.event([_choice(i, {"role": "assistant", "content": "", "tool_calls": None})])
            async for e in self.events():
                logprobs = wire.dump(chat_logprobs(e.logprobs)) if want_logprobs and e.logprobs else None
                yield events.event([_choice(e.index, _delta(e), e.finish_reason, logprobs, e.stop_sequence)])
            if include_usage and self.usage is not None:
                yield events.usage_event(self.usage)
        except APIError as exc:
            yield sse(exc.to_body())
        yield sse("[DONE]")


def _choice(index: int, delta: dict[str, Any], finish_reason: str | None = None,
            logprobs: dict[str, Any] | None = None, stop_reason: str | None = None) -> dict[str, Any]:
    """A `ChatChunkChoice` as a plain dict in its field order (what its event serializes)."""
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs,
            "stop_reason": stop_reason}


def _delta(e: ChoiceEvent) -> dict[str, Any]:
    """The event's `ChatDelta` as a plain dict in its field order."""
    if e.call_index is None:
        return {"role": None, "content": None if e.finish_reason is not None else e.content, "tool_calls": None}
    call: dict[str, Any] = {"index": e.call_index, "function": {"arguments": e.arguments}}
    if e.call_id is not None:
        call.update(id=e.call_id, type="function")
        call["function"]["name"] = e.name
    return {"role": None, "content": None, "tool_calls": [call]}


def assistant_message(result: GenerationResult) -> wire.AssistantMessage:
    """The answer: its content, and its tool calls (content is null when only calls were made)."""
    if not result.tool_calls:
        return wire.AssistantMessage(content=result.text)
    return wire.AssistantMessage(content=result.text.strip() or None, tool_calls=[_call(c) for c in result.tool_calls])


def _call(call: ToolCallDelta) -> wire.ToolCallOut:
    return wire.ToolCallOut(id=call.id or "", function=wire.FunctionCallOut(name=call.name or "",
                                                                           arguments=call.arguments))


async def create_chat_completion(runtime: Runtime, body: wire.ChatCompletionRequest,
                                 client: str | None = None) -> dict[str, Any]:
    """Run a chat completion (every choice, concurrently) to the end and return the OpenAI response body."""
    return await start_chat(runtime, body, client).result()


async def chat_reply(runtime: Runtime, raw: bytes, client: str) -> dict[str, Any] | AsyncIterator[str]:
    """An HTTP chat completion: the body validated, the client admitted, the generations prepared (every 400,
    429 and 503 before anything runs); the `chat.completion` body, or its SSE events when it streams."""
    body = parse_body(raw, wire.ChatCompletionRequest)
    runtime.admit(client)
    run = await runtime.off_loop(len(raw), start_chat, runtime, body, client)
    if body.stream:
        return run.sse(bool(body.stream_options and body.stream_options.include_usage))
    return await run.result()
