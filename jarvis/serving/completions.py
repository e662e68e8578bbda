"""Text completions: a `CompletionRequest` (one or several prompts, n choices each) → generations → the
OpenAI response or its SSE events (echo and prompt logprobs included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from jarvis import protocol as wire
from jarvis.bodies import parse_body
from jarvis.engine import GenerationChunk, GenerationRequest, GenerationResult, PreparedRequest, RequestContext
from jarvis.errors import InvalidRequest
from jarvis.serving.render import ChunkEvents, completion_logprobs, stream_events, usage
from jarvis.serving.requests import choice_seed, generation_options

if TYPE_CHECKING:
    from jarvis.runtime import Runtime


def completion_generations(runtime: Runtime, body: wire.CompletionRequest,
                           client: str | None = None) -> list[PreparedRequest]:
    """Prepared generations in OpenAI's choice order: prompt by prompt, n choices each."""
    options = generation_options(body)
    gens = []
    for prompt in body.prompts:
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        first = runtime.prepare(GenerationRequest(
            prompt=text, prompt_token_ids=ids, model=body.model, kind="completion", max_tokens=body.max_tokens,
            context=RequestContext(client=client), logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0, echo=body.echo,
            **options))
        gens += [first, *(first.for_choice(i, choice_seed(body.seed, i)) for i in range(1, body.n))]
    return gens


async def create_completion(runtime: Runtime, body: wire.CompletionRequest,
                            client: str | None = None) -> dict[str, Any]:
    """Run a text completion (every prompt and choice, concurrently) and return the OpenAI response body."""
    return await run_completion(runtime, body, completion_generations(runtime, body, client))


async def run_completion(runtime: Runtime, body: wire.CompletionRequest, gens: list[PreparedRequest]
                         ) -> dict[str, Any]:
    """The OpenAI response body of `body`'s prepared generations, run concurrently."""
    results = await asyncio.gather(*(runtime.generate(gen) for gen in gens))  # a batching engine batches them
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (gen, result) in enumerate(zip(gens, results)):
        text = (gen.prompt or "") + result.text if gen.echo else result.text
        choices.append(wire.CompletionChoice(
            index=index, text=text, finish_reason=result.finish_reason,
            logprobs=completion_logprobs(result, gen.echo) if gen.logprobs else None,
            stop_reason=result.stop_sequence))
        if index % body.n == 0:  # a prompt counts once, however many choices it has
            prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
    return wire.dump(wire.Completion(
        id=wire.new_id("cmpl"), created=wire.now(), model=body.model, choices=choices,
        usage=usage(prompt_tokens, completion_tokens)))


def completion_events(runtime: Runtime, gens: list[PreparedRequest], include_usage: bool) -> AsyncIterator[str]:
    """The SSE events of a streamed completion of one prompt (n choices, each with its `index`)."""
    events = ChunkEvents(wire.Completion(id=wire.new_id("cmpl"), created=wire.now(), model=gens[0].model, choices=[]))
    offsets, echoed = [0] * len(gens), [False] * len(gens)

    def choice(index: int, chunk: GenerationChunk) -> dict[str, Any]:
        """The chunk as a `CompletionChoice` (a plain dict in its field order)."""
        gen, text, entries = gens[index], chunk.text, chunk.logprobs
        if gen.echo and not echoed[index]:
            echoed[index] = True
            text = (gen.prompt or "") + text
            entries = [*(chunk.prompt_logprobs or []), *entries]
        logprobs = None
        if gen.logprobs:
            logprobs = wire.dump(completion_logprobs(GenerationResult("", "stop", 0, 0, logprobs=entries),
                                                     echo=False, offset=offsets[index]))
            offsets[index] += sum(len(e.token) for e in entries)
        return {"index": index, "text": text, "finish_reason": chunk.finish_reason, "logprobs": logprobs,
                "stop_reason": chunk.stop_sequence}

    def render(index: int, chunk: GenerationChunk) -> str | None:
        # a chunk of generated tokens is an event even when its text is held back (a partial UTF-8 character,
        # a possible stop string's start): one event per engine step, as vLLM's server streams them
        wanted = chunk.text or chunk.token_count or chunk.logprobs or chunk.finish_reason or chunk.prompt_logprobs
        return events.event([choice(index, chunk)]) if wanted else None

    return stream_events(runtime, gens, [], render, events.usage_event if include_usage else None)


async def completion_reply(runtime: Runtime, raw: bytes, client: str) -> dict[str, Any] | AsyncIterator[str]:
    """An HTTP text completion: validated, admitted and prepared before anything runs; the `text_completion`
    body, or its SSE events when it streams (one prompt per streamed request)."""
    body = parse_body(raw, wire.CompletionRequest)
    if body.stream and len(body.prompts) > 1:
        raise InvalidRequest("Streaming supports one prompt per request.", param="prompt")
    runtime.admit(client)
    gens = await runtime.off_loop(len(raw), completion_generations, runtime, body, client)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return completion_events(runtime, gens, include_usage)
    return await run_completion(runtime, body, gens)
