"""Chat completions: a `ChatCompletionRequest` → n generations → the OpenAI response or its SSE events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from jarvis import protocol as wire
from jarvis.engine import GenerationChunk, GenerationRequest
from jarvis.errors import APIError
from jarvis.serving.render import chat_logprobs, merged_streams, sse, usage
from jarvis.serving.requests import choice_seed, generation_options


def chat_generations(runtime: Any, body: wire.ChatCompletionRequest,
                     client: str | None = None) -> list[GenerationRequest]:
    """One prepared generation per choice (n), each with its own seed when the body has one."""
    first = runtime.prepare(GenerationRequest(
        prompt=None, model=body.model, kind="chat", client=client,
        messages=[m.normalised() for m in body.messages], max_tokens=body.token_limit,
        logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, **generation_options(body)))
    return [first, *(replace(first, seed=choice_seed(body.seed, i), request_id=f"{first.request_id}-{i}",
                             first_token_at=None) for i in range(1, body.n))]


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


async def chat_events(runtime: Any, gens: list[GenerationRequest], include_usage: bool) -> AsyncIterator[str]:
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

    prompt_tokens, completion_tokens = 0, [0] * len(gens)
    try:
        for index in range(len(gens)):  # OpenAI opens every choice with the role
            yield event([wire.ChatChunkChoice(index=index, delta=wire.ChatDelta(role="assistant", content=""))])
        async for index, chunk in merged_streams(runtime, gens):
            if chunk.text or chunk.logprobs or chunk.finish_reason:
                yield event([choice(index, chunk)])
            if chunk.finish_reason is not None:
                prompt_tokens = chunk.prompt_tokens or 0
                completion_tokens[index] = chunk.completion_tokens or 0
        if include_usage:
            yield event([], usage(prompt_tokens, sum(completion_tokens)))
    except APIError as exc:
        yield sse(exc.to_body())
    yield sse("[DONE]")
