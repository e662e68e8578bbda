"""Does Anthropic's Messages API cost anything over Chat Completions? The same prompt through both, side by side.

`/v1/messages` is translated onto the chat path (`jarvis.serving.messages`), so the engine's work is the same;
what differs is the translation and the rendering of Anthropic's events. Per engine, one `python -m jarvis serve`
of the embedded gemma-3-270m (default settings), and per round each route once streamed and once not, the order
alternating request by request: the same user message, greedy, the same max_tokens, so both routes generate the
same tokens. Reported: output tokens/s (generated tokens / wall time of the request), time to the first text
delta (streamed), and messages ÷ chat. Goal: tokens/s ≥ 0.98× chat.

    python bench/messages_overhead.py [--engines llama_cpp,hf,vllm] [--rounds R] [--max-tokens N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"
PROMPT = "Write a long story about a lighthouse keeper and the sea."
GOAL = 0.98


def chat(client: httpx.Client, stream: bool, max_tokens: int) -> tuple[int, float, float | None]:
    """(completion tokens, seconds, seconds to the first content) of one chat completion."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    start, first, tokens = time.perf_counter(), None, 0
    if not stream:
        answer = client.post("/v1/chat/completions", json=body).raise_for_status().json()
        return answer["usage"]["completion_tokens"], time.perf_counter() - start, None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.raise_for_status().iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - start, first


def messages(client: httpx.Client, stream: bool, max_tokens: int) -> tuple[int, float, float | None]:
    """(output tokens, seconds, seconds to the first text delta) of one Messages request."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    start, first, tokens = time.perf_counter(), None, 0
    if not stream:
        answer = client.post("/v1/messages", json=body).raise_for_status().json()
        return answer["usage"]["output_tokens"], time.perf_counter() - start, None
    with client.stream("POST", "/v1/messages", json=body) as r:
        for line in r.raise_for_status().iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if first is None and event["type"] == "content_block_delta":
                first = time.perf_counter() - start
            if event["type"] == "message_delta":
                tokens = event["usage"]["output_tokens"]
    return tokens, time.perf_counter() - start, first


def measure(base_url: str, rounds: int, max_tokens: int) -> dict[str, dict[str, Any]]:
    routes = {"chat": chat, "messages": messages}
    samples: dict[str, list[tuple[int, float, float | None]]] = {f"{r} {m}": [] for r in routes
                                                                  for m in ("stream", "whole")}
    with httpx.Client(base_url=base_url, timeout=600) as client:
        for route in routes.values():  # warm both paths
            route(client, True, 4)
        for i in range(rounds):
            order = list(routes.items()) if i % 2 == 0 else list(routes.items())[::-1]
            for stream in (True, False):
                for name, route in order:
                    samples[f"{name} {'stream' if stream else 'whole'}"].append(route(client, stream, max_tokens))
    out = {}
    for key, runs in samples.items():
        out[key] = {"tokens_per_s": statistics.median(t / s for t, s, _ in runs),
                    "tokens": statistics.median(t for t, _, _ in runs),
                    "first_s": statistics.median(f for _, _, f in runs) if runs[0][2] is not None else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="llama_cpp")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    results: dict[str, Any] = {}
    for engine in args.engines.split(","):
        with jarvis_server(JARVIS_INFERENCE_ENGINE=engine, ready_timeout_s=600) as v1:
            results[engine] = measure(v1.removesuffix("/v1"), args.rounds, args.max_tokens)
    table = Table(title=f"/v1/messages vs /v1/chat/completions, {args.max_tokens} tokens, median of {args.rounds}")
    for column in ("engine", "mode", "chat tok/s", "messages tok/s", "ratio", "tokens", "chat TTFT ms",
                   "messages TTFT ms"):
        table.add_column(column)
    for engine, r in results.items():
        for mode in ("stream", "whole"):
            c, m = r[f"chat {mode}"], r[f"messages {mode}"]
            ratio = m["tokens_per_s"] / c["tokens_per_s"]
            table.add_row(engine, mode, f"{c['tokens_per_s']:.1f}", f"{m['tokens_per_s']:.1f}",
                          f"[{'green' if ratio >= GOAL else 'red'}]{ratio:.3f}×",
                          f"{c['tokens']:.0f}/{m['tokens']:.0f}",
                          f"{c['first_s'] * 1000:.1f}" if c["first_s"] else "-",
                          f"{m['first_s'] * 1000:.1f}" if m["first_s"] else "-")
    console.print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "messages_overhead.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
