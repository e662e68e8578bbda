"""What does a constrained tool call cost? Latency of a named-function call, constraint on vs off, per engine.

For each engine (a fresh `jarvis serve` each; llama_cpp by default, also hf, vllm and openai — the last a
Jarvis on the `openai` engine in front of a llama_cpp Jarvis, so the constraint travels upstream) the
same conversation (a user asks for the weather in a city; one `get_weather` tool whose arguments are a
city and an enum unit) is sent R rounds two ways, streamed over httpx, one request at a time:

  on    `tool_choice` {"type": "function", "function": {"name": "get_weather"}}: decoding is constrained
        to the function's arguments schema (llama.cpp's grammar sampler, xgrammar in the hf scheduler,
        vLLM's structured outputs), up to --max-tokens;
  off   the same messages and tools under `tool_choice` "auto" (no constraint), with `max_tokens` = the
        completion tokens the round's "on" request used and `ignore_eos: true`, so both sides generate
        the same number of tokens from the same prompt (the base model's free answer is whatever it is:
        text, or a `<tool_call>` block).

Each round first sends an unmeasured "on" request (the probe): it gives the round's token count before
either side is timed, and leaves the round's prompt in the engine's prefix cache for both sides alike (the
prompt is the same: the tools are described the same way under either tool_choice). Then which side goes
first alternates from round to round, so background load hits both alike; all are sampled at temperature
0.7 with the round's seed (a measured "on" that sampled another token count than its probe is reported).

Per request: TTFT = time to the first chunk after the role chunk that carries anything (content or a
tool-call piece; the finish chunk if nothing came before it — under "auto", text that may still become a
call is held back, and that wait is part of its TTFT); "call" = time to the finish chunk (on: the call is
complete; off: the same number of tokens is done); completion tokens from `stream_options.include_usage`;
decode tok/s = (completion tokens - 1) / (finish - first chunk). The table shows medians over the rounds;
"ratio" = on / off for the call time (1.00 = the constraint is free, > 1 it costs) and on / off for tok/s
(< 1 it costs). "valid" counts "on" calls whose reassembled arguments parse and validate against the
schema with `jsonschema` (k/R); "cut" counts "on" requests that hit --max-tokens first (their arguments
are a prefix, not a call). A warm-up request per side runs first (the first constraint compiles its
grammar). --json OUT writes every request's numbers, text and calls.

    python bench/tool_calls.py [--engines llama_cpp,hf,vllm,openai] [--rounds R] [--max-tokens M] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 30},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                           "parameters": WEATHER}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Perth"]
BASE = {"JARVIS_MAX_MODEL_LEN": "1024"}
ENGINE_SETTINGS = {"llama_cpp": {}, "hf": {}, "vllm": {"JARVIS_VLLM_CPU_KVCACHE_SPACE": "1"}}


def messages(round_: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is the weather in {CITIES[round_ % len(CITIES)]}?"}]


def timed(http: httpx.Client, round_: int, constrained: bool, max_tokens: int) -> dict[str, Any]:
    """One streamed request: ttft and call (seconds from sending), tokens, finish_reason, what came back."""
    body: dict[str, Any] = {"model": MODEL, "messages": messages(round_), "tools": TOOLS, "max_tokens": max_tokens,
                            "temperature": 0.7, "seed": round_, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"tool_choice": NAMED} if constrained else {"tool_choice": "auto", "ignore_eos": True})
    first = finished = None
    finish, usage, content, calls = "", {}, [], {}
    started = time.perf_counter()
    with http.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        role_seen = False
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error in stream: {chunk['error']}")
            now = time.perf_counter()
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                if not role_seen and delta.get("role"):
                    role_seen = True
                    continue
                if delta.get("content") or delta.get("tool_calls"):
                    first = first if first is not None else now
                content.append(delta.get("content") or "")
                for piece in delta.get("tool_calls") or []:
                    call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
                    function = piece.get("function") or {}
                    call["name"] += function.get("name") or ""
                    call["arguments"] += function.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish, finished = choice["finish_reason"], now
                    first = first if first is not None else now
    ended = time.perf_counter()
    finished = finished if finished is not None else ended
    first = first if first is not None else finished
    return {"ttft": first - started, "call": finished - started, "decode": finished - first,
            "tokens": usage.get("completion_tokens", 0), "prompt_tokens": usage.get("prompt_tokens", 0),
            "finish": finish, "content": "".join(content), "calls": [calls[i] for i in sorted(calls)]}


def valid(result: dict[str, Any]) -> bool:
    if len(result["calls"]) != 1 or result["calls"][0]["name"] != "get_weather":
        return False
    try:
        jsonschema.validate(json.loads(result["calls"][0]["arguments"]), WEATHER)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def convert_model() -> None:
    """hf and vllm serve the embedded model as a transformers folder: convert it once, before the server
    starts (a no-op once done), so the conversion is neither timed nor raced by the server."""
    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.settings import load_settings

    print(f"  model folder: {embedded_hf_model(load_settings().data_dir)}", file=sys.stderr)


def bench_engine(engine: str, rounds: int, max_tokens: int) -> dict[str, Any]:
    with ExitStack() as stack:
        if engine == "openai":
            upstream = stack.enter_context(jarvis_server(JARVIS_INFERENCE_ENGINE="llama_cpp", **BASE))
            settings = {"JARVIS_INFERENCE_ENGINE": "openai", "JARVIS_UPSTREAM_URL": upstream}
        else:
            if engine in ("hf", "vllm"):
                convert_model()
            settings = {"JARVIS_INFERENCE_ENGINE": engine, **BASE, **ENGINE_SETTINGS.get(engine, {})}
        base_url = stack.enter_context(jarvis_server(ready_timeout_s=900, **settings))
        http = stack.enter_context(httpx.Client(base_url=base_url, timeout=600))
        timed(http, 0, True, 16)  # warm-up, both sides (the first constraint compiles)
        timed(http, 0, False, 16)
        raw: list[dict[str, Any]] = []
        for r in range(rounds):
            probe = timed(http, r, True, max_tokens)  # the round's token count; warms its prompt for both sides
            on_first = r % 2 == 0
            for constrained in ((True, False) if on_first else (False, True)):
                if constrained:
                    on = timed(http, r, True, max_tokens)
                else:
                    off = timed(http, r, False, max(probe["tokens"], 1))
            if on["tokens"] != probe["tokens"]:
                print(f"  {engine} round {r}: 'on' used {probe['tokens']} then {on['tokens']} tokens "
                      "(the same seed sampled differently)", file=sys.stderr)
            if on["prompt_tokens"] != off["prompt_tokens"]:
                print(f"  {engine} round {r}: prompts differ, {on['prompt_tokens']} tokens on, "
                      f"{off['prompt_tokens']} off", file=sys.stderr)
            on["valid"] = valid(on)
            if not on["valid"] and on["finish"] != "length":
                print(f"  {engine} round {r}: invalid call {on['calls']!r} (finish {on['finish']})", file=sys.stderr)
            raw.append({"round": r, "on_first": on_first, "on": on, "off": off})
            print(f"  {engine} round {r + 1}/{rounds}: on {on['call'] * 1e3:.0f} ms / off {off['call'] * 1e3:.0f} ms"
                  f", {on['tokens']} tokens", file=sys.stderr)

    def median(side: str, key: str) -> float:
        return statistics.median(x[side][key] for x in raw)

    def rate(side: str) -> float:
        rates = [(x[side]["tokens"] - 1) / x[side]["decode"] for x in raw
                 if x[side]["tokens"] > 1 and x[side]["decode"] > 0]
        return statistics.median(rates) if rates else float("nan")

    summary = {"ttft_on_ms": median("on", "ttft") * 1e3, "ttft_off_ms": median("off", "ttft") * 1e3,
               "call_on_ms": median("on", "call") * 1e3, "call_off_ms": median("off", "call") * 1e3,
               "tok_s_on": rate("on"), "tok_s_off": rate("off"), "tokens": median("on", "tokens"),
               "valid": sum(x["on"]["valid"] for x in raw), "cut": sum(x["on"]["finish"] == "length" for x in raw),
               "rounds": rounds}
    summary["call_ratio"] = summary["call_on_ms"] / summary["call_off_ms"]
    summary["tok_s_ratio"] = summary["tok_s_on"] / summary["tok_s_off"]
    return {"summary": summary, "rounds": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="llama_cpp", help="comma-separated: llama_cpp,hf,vllm,openai")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per engine (one on and one off request each)")
    parser.add_argument("--max-tokens", type=int, default=120, help="max_tokens of the constrained request")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the raw numbers here")
    args = parser.parse_args()
    results = {}
    for engine in args.engines.split(","):
        print(f"{engine}: {args.rounds} rounds ...", file=sys.stderr)
        results[engine] = bench_engine(engine, args.rounds, args.max_tokens)
    print(f"\n{'engine':<10} {'TTFT ms on/off':>15} {'call ms on/off':>16} {'ratio':>6} "
          f"{'tok/s on/off':>14} {'ratio':>6} {'tokens':>6} {'valid':>6} {'cut':>4}")
    for engine, result in results.items():
        s = result["summary"]
        print(f"{engine:<10} {s['ttft_on_ms']:>7.0f}/{s['ttft_off_ms']:<7.0f}"
              f" {s['call_on_ms']:>8.0f}/{s['call_off_ms']:<7.0f} {s['call_ratio']:>6.2f}"
              f" {s['tok_s_on']:>7.1f}/{s['tok_s_off']:<6.1f} {s['tok_s_ratio']:>6.2f}"
              f" {s['tokens']:>6.0f} {s['valid']:>3}/{s['rounds']:<2} {s['cut']:>4}")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "engines": results},
                                        indent=1))
        print(f"raw numbers: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
