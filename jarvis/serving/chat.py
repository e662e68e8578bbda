"""Chat completions: a `ChatCompletionRequest` → n generations → the OpenAI response or its SSE events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from jarvis import protocol as wire
from jarvis.engine import GenerationChunk, GenerationRequest, RequestContext
from jarvis.serving.render import chat_logprobs, sse, stream_events, usage
from jarvis.serving.requests import choice_seed, generation_options


def chat_generations(runtime: Any, body: wire.ChatCompletionRequest,
                     client: str | None = None) -> list[GenerationRequest]:
    """One prepared generation per choice (n), each with its own seed when the body has one."""
    first = runtime.prepare(GenerationRequest(
        prompt=None, model=body.model, kind="chat", context=RequestContext(client=client),
        messages=[m.normalised() for m in body.messages], max_tokens=body.token_limit,
        logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, **generation_options(body)))
    return [first, *(first.for_choice(i, choice_seed(body.seed, i)) for i in range(1, body.n))]


async def create_chat_completion(runtime: Any, body: wire.ChatCompletionRequest,
                                 client: str | None = None) -> dict[str, Any]:
    """Run a chat completion (every choice, concurrently) to the end and return the OpenAI response body."""
    gens = chat_generations(runtime, body, client)
    results = await asyncio.gather(*(runtime.generate(gen) for gen in gens))
    return wire.dump(wire.ChatCompletion(
        id=wire.new_id("chatcmpl"), created=wire.now(), model=body.model,
        choices=[wire.ChatChoice(index=i, message=wire.AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                                 logprobs=chat_logprobs(r.logprobs) if body.logprobs else None)
                 for i, r in enumerate(results)],
        usage=usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))))


def chat_events(runtime: Any, gens: list[GenerationRequest], include_usage: bool) -> AsyncIterator[str]:
    """The SSE events of a streamed chat completion; choices carry their `index`."""
    ident, created, model = wire.new_id("chatcmpl"), wire.now(), gens[0].model
    want_logprobs = gens[0].logprobs

    def event(choices: list[wire.ChatChunkChoice], usage_: wire.Usage | None = None) -> str:
        return sse(wire.dump(wire.ChatCompletionChunk(id=ident, created=created, model=model, choices=choices,
                                                      usage=usage_)))

    def choice(index: int, chunk: GenerationChunk) -> wire.ChatChunkChoice:
        return wire.ChatChunkChoice(
            index=index, delta=wire.ChatDelta(content=chunk.text) if chunk.text else wire.ChatDelta(),
            finish_reason=chunk.finish_reason,
            logprobs=chat_logprobs(chunk.logprobs) if want_logprobs and chunk.logprobs else None)

    def render(index: int, chunk: GenerationChunk) -> str | None:
        return event([choice(index, chunk)]) if chunk.text or chunk.logprobs or chunk.finish_reason else None

    opening = [event([wire.ChatChunkChoice(index=i, delta=wire.ChatDelta(role="assistant", content=""))])
               for i in range(len(gens))]  # OpenAI opens every choice with the role
    return stream_events(runtime, gens, opening, render, (lambda u: event([], u)) if include_usage else None)
