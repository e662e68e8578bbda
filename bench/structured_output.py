"""What does constrained decoding cost? Tokens/s with a JSON schema vs unconstrained, per engine, in one run.

For each engine (a fresh `jarvis serve` each: llama_cpp, hf, vllm by default) the same chat prompts run
two ways, interleaved request by request so background load hits both alike:

  free     no constraint;
  schema   `response_format` json_schema (a nested object with an enum, an array and bounded strings,
           `strict: true`) — llama.cpp's GBNF grammar sampler, xgrammar masks in the hf scheduler, vLLM's
           structured outputs.

Both are sampled at temperature 0.7 with a per-request seed, so neither loops on one greedy token,
through the official `openai` client, streamed, sequentially (one request at a time: the per-token
cost, not batching). "tok/s" = decode speed after the first token ((completion tokens - 1) / time from
the first to the last token), the median over requests; "ratio" = schema / free (1.00 = free of cost;
the goal is ≥ 0.80). Time to first token is shown apart (it holds the constraint's compilation and the
first step's mask): a free answer usually runs to max_tokens while a schema answer ends early, so a
whole-request rate would charge the prompt's time to the shorter answer. Every constrained answer is checked against
the schema with `jsonschema`: "valid" counts those that parse and validate, "cut" those that hit
max_tokens first (a valid prefix, as OpenAI's are); valid + cut should be every request.

    python bench/structured_output.py [--engines llama_cpp,hf,vllm] [--requests N] [--max-tokens M]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import openai

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"
SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "colour", "tags", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 40}, "zip": {"type": "integer"}}},
    },
}
PROMPTS = ["Describe a person as JSON.", "Invent a character for a story, as JSON.",
           "Give the details of a customer record in JSON.", "Write a JSON profile of a friendly neighbour."]
ENGINE_SETTINGS = {"llama_cpp": {}, "hf": {}, "vllm": {"JARVIS_VLLM_CPU_KVCACHE_SPACE": "1"}}


def timed(client: openai.OpenAI, prompt: str, seed: int, max_tokens: int,
          constrained: bool) -> tuple[float, float, int, str, str]:
    """(time to first token, decode seconds after it, completion tokens, text, finish_reason), streamed."""
    schema = {"name": "person", "schema": SCHEMA, "strict": True}
    extra = {"response_format": {"type": "json_schema", "json_schema": schema}} if constrained else {}
    started = time.perf_counter()
    first, text, finish, tokens = None, [], "", 0
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0.7, seed=seed, stream=True,
                                            stream_options={"include_usage": True}, **extra)
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter()
                text.append(choice.delta.content)
            finish = choice.finish_reason or finish
    ended = time.perf_counter()
    first = first if first is not None else ended
    return first - started, ended - first, tokens, "".join(text), finish


def bench_engine(engine: str, requests: int, max_tokens: int) -> dict[str, float]:
    settings = {"JARVIS_INFERENCE_ENGINE": engine, "JARVIS_MAX_MODEL_LEN": "1024", **ENGINE_SETTINGS.get(engine, {})}
    with jarvis_server(ready_timeout_s=900, **settings) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        timed(client, PROMPTS[0], 0, 16, False)  # warm-up, both paths (the first constraint compiles)
        timed(client, PROMPTS[0], 0, 16, True)
        rates: dict[bool, list[float]] = {False: [], True: []}
        ttft: dict[bool, list[float]] = {False: [], True: []}
        valid = cut = 0
        for i in range(requests):
            for constrained in ((False, True) if i % 2 == 0 else (True, False)):
                first, decode, tokens, text, finish = timed(client, PROMPTS[i % len(PROMPTS)], i, max_tokens,
                                                            constrained)
                ttft[constrained].append(first)
                if tokens > 1:
                    rates[constrained].append((tokens - 1) / decode)
                if constrained and finish == "length":
                    cut += 1  # cut by max_tokens: a prefix of a valid answer, as OpenAI's is
                elif constrained:
                    try:
                        jsonschema.validate(json.loads(text), SCHEMA)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError):
                        print(f"  {engine}: invalid constrained answer: {text[:120]!r}", file=sys.stderr)
    free, schema = statistics.median(rates[False]), statistics.median(rates[True])
    return {"free": free, "schema": schema, "ratio": schema / free, "valid": valid, "cut": cut, "requests": requests,
            "ttft_free": statistics.median(ttft[False]) * 1e3, "ttft_schema": statistics.median(ttft[True]) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="llama_cpp,hf,vllm")
    parser.add_argument("--requests", type=int, default=8, help="requests per path and engine")
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()
    rows = {}
    for engine in args.engines.split(","):
        print(f"{engine}: {args.requests} requests per path ...", file=sys.stderr)
        rows[engine] = bench_engine(engine, args.requests, args.max_tokens)
    print(f"\n{'engine':<10} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>7} {'valid':>7} {'cut':>4} "
          f"{'TTFT ms free/schema':>20}")
    for engine, r in rows.items():
        print(f"{engine:<10} {r['free']:>11.1f} {r['schema']:>13.1f} {r['ratio']:>7.2f} "
              f"{r['valid']:>3}/{r['requests']:<3} {r['cut']:>4} {r['ttft_free']:>10.0f}/{r['ttft_schema']:<9.0f}")


if __name__ == "__main__":
    main()
