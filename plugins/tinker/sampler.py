"""Sampling for the Tinker API through the serving engine: the same runtime path as /v1/completions.

A sample is a completion of a token-id prompt on the base model or on an adapter the trainer published to
the engine, with logprobs on: each generated token comes back as its vocabulary id and logprob (what an
RL loop trains on), never re-tokenized text. `num_samples` runs as that many requests at once (seeded
`seed + i` when a seed is given), so the engine batches them.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from jarvis.engine import GenerationRequest, GenerationResult
from jarvis.errors import APIError
from jarvis.plugins.tinker.futures import RequestFailed
from jarvis.plugins.tinker.proto import Sequence, encode_sample_response


def engine_request(model: str, prompt: list[int], params: Any, seed: int | None, echo: bool,
                   client: str | None) -> GenerationRequest:
    """A completion request of the SDK's SamplingParams, or a user error naming what cannot be honoured."""
    stop = params.stop
    if stop is not None and not isinstance(stop, str) and any(isinstance(s, int) for s in stop):
        raise RequestFailed("sampling_params.stop as token ids is not supported by Jarvis; send stop strings.")
    if params.top_k is not None and (params.top_k == 0 or params.top_k < -1):
        raise RequestFailed(f"sampling_params.top_k must be -1 (no limit) or positive, got {params.top_k}.")
    request = GenerationRequest(
        prompt=None, prompt_token_ids=prompt, model=model, max_tokens=params.max_tokens,
        temperature=params.temperature, top_p=params.top_p, top_k=0 if params.top_k in (None, -1) else params.top_k,
        seed=seed, stop=[stop] if isinstance(stop, str) else list(stop or []),
        ignore_eos=stop is not None and len(stop) == 0,  # [] turns every stop off, end of sequence included
        logprobs=True, echo=echo)
    request.context.client = client
    request.context.api = "tinker"
    return request


def sequence_of(result: GenerationResult, engine: str) -> Sequence:
    ids = [lp.token_id for lp in result.logprobs]
    if any(i is None for i in ids):
        raise RequestFailed(f"The {engine} engine does not report the ids of the tokens it samples; sample from "
                            "llama_cpp, hf or vllm.", category="server")
    logprobs = [lp.logprob if lp.logprob is not None else math.nan for lp in result.logprobs]
    return Sequence(tokens=ids, logprobs=logprobs,  # type: ignore[arg-type]
                    stop_reason="length" if result.finish_reason == "length" else "stop")


async def sample(runtime: Any, model: str, prompt: list[int], num_samples: int, params: Any,
                 prompt_logprobs: bool, client: str | None) -> bytes:
    """`num_samples` completions of `prompt` from `model` (the base or a published adapter), as the SDK's
    SampleResponse; prompt logprobs (NaN at position 0) when asked."""
    if not prompt:
        raise RequestFailed("prompt has no tokens.")
    if num_samples < 1:
        raise RequestFailed(f"num_samples must be at least 1, got {num_samples}.")
    try:
        prepared = [runtime.prepare(engine_request(model, prompt, params,
                                                   None if params.seed is None else params.seed + i,
                                                   prompt_logprobs and i == 0, client))
                    for i in range(num_samples)]
        results = await asyncio.gather(*(runtime.generate(p) for p in prepared))
    except APIError as exc:
        raise RequestFailed(exc.message, category="server" if exc.status_code >= 500 else "user") from None
    engine = runtime.engine.name
    sequences = [sequence_of(r, engine) for r in results]
    scored = None
    if prompt_logprobs:
        first = results[0].prompt_logprobs or []
        scored = [math.nan] + [lp.logprob if lp.logprob is not None else math.nan for lp in first[1:len(prompt)]]
        scored += [math.nan] * (len(prompt) - len(scored))
    return encode_sample_response(sequences, scored)
