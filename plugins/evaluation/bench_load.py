"""Load generation for `jarvis bench`: streamed requests at a fixed concurrency or Poisson arrivals, timed.

Every request is a streamed `/v1/completions` (or `/v1/chat/completions`)
call; its timings are taken on the client: start, first content event (time
to first token), every later content event (inter-token latency), end. The
output token count is the server's `usage.completion_tokens` when it sends
usage, else the number of content events. A non-200 answer, an error event in
the stream or a transport error counts as an error, never silently dropped.

Summaries use the stored raw timings only: wall time is the last end minus
the first start of a block of requests, request throughput is requests
(successes + errors) divided by the wall time, output tokens/s likewise.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions in history are",
    "Write a short note to a friend about the weekend:",
    "Here is a simple recipe for pancakes:",
    "The capital of France is",
    "In machine learning, overfitting means",
    "A good way to start the morning is",
]


@dataclass
class RequestTiming:
    index: int
    target: str
    prompt_index: int
    start_s: float  # seconds since the run's clock started
    end_s: float = 0.0
    ttft_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    block: int = 0

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        if self.error or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency_s": self.latency_s, "tpot_s": self.tpot_s}


def load_prompts(path: Path | None) -> list[str]:
    """A `.jsonl` of {"prompt": ...} (or {"text": ...}) records, or a text file with one prompt per line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if path.suffix in (".jsonl", ".ndjson"):
            record = json.loads(line)
            prompts.append(record.get("prompt") or record.get("text") or record["instruction"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None, "p50": percentile(values, 50),
            "p95": percentile(values, 95), "p99": percentile(values, 99),
            "min": min(values) if values else None, "max": max(values) if values else None}


def block_wall(timings: Sequence[RequestTiming]) -> float:
    return max(t.end_s for t in timings) - min(t.start_s for t in timings) if timings else 0.0


def summarise(timings: Sequence[RequestTiming]) -> dict[str, Any]:
    """Every metric of a set of requests from their raw timings (wall time summed over their blocks)."""
    ok = [t for t in timings if not t.error]
    blocks: dict[int, list[RequestTiming]] = {}
    for t in timings:
        blocks.setdefault(t.block, []).append(t)
    wall = sum(block_wall(b) for b in blocks.values())
    tokens = sum(t.output_tokens for t in ok)
    return {
        "requests": len(timings), "successes": len(ok), "errors": len(timings) - len(ok),
        "wall_s": wall, "request_throughput": len(timings) / wall if wall else None,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall else None,
        "latency_s": distribution([t.latency_s for t in ok]),
        "ttft_s": distribution([t.ttft_s for t in ok if t.ttft_s is not None]),
        "tpot_s": distribution([t.tpot_s for t in ok if t.tpot_s is not None]),
        "itl_s": distribution([gap for t in ok for gap in t.itl_s]),
        "error_samples": sorted({t.error for t in timings if t.error})[:5],
    }


@dataclass
class Target:
    label: str
    url: str  # the /v1 base
    model: str
    chat: bool = False
    api_key: str | None = None


async def timed_request(client: Any, target: Target, prompt: str, max_tokens: int, timing: RequestTiming,
                        clock: Callable[[], float], seed: int) -> None:
    body: dict[str, Any] = {"model": target.model, "max_tokens": max_tokens, "temperature": 0.0, "seed": seed,
                            "stream": True, "stream_options": {"include_usage": True}}
    if target.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/chat/completions" if target.chat else "/completions"
    events, usage_tokens, last = 0, None, None
    try:
        async with client.stream("POST", f"{target.url}{path}", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                timing.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    timing.error = f"stream error: {str(data['error'])[:200]}"
                    break
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                choices = data.get("choices") or []
                text = ""
                if choices:
                    text = choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""
                if text:
                    now = clock()
                    if timing.ttft_s is None:
                        timing.ttft_s = now - timing.start_s
                    else:
                        timing.itl_s.append(now - last)
                    last = now
                    events += 1
    except Exception as exc:  # noqa: BLE001 - a failed request is a measured error
        timing.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        timing.end_s = clock()
        timing.output_tokens = usage_tokens if usage_tokens is not None else events


async def run_block(target: Target, prompts: Sequence[str], indices: Sequence[int], *, max_tokens: int,
                    concurrency: int | None, rate: float | None, seed: int, clock: Callable[[], float],
                    block: int, on_done: Callable[[], None] = lambda: None,
                    timeout: float = 600) -> list[RequestTiming]:
    """Send requests `indices` (prompt = index mod len(prompts)) to `target`, bounded by `concurrency` or
    arriving as a Poisson process of `rate` requests/s (seeded exponential gaps)."""
    import httpx

    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=64)
    timings: list[RequestTiming] = []
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        async def one(i: int) -> None:
            timing = RequestTiming(i, target.label, i % len(prompts), clock(), block=block)
            timings.append(timing)
            await timed_request(client, target, prompts[i % len(prompts)], max_tokens, timing, clock, seed + i)
            on_done()

        if rate is not None:
            gaps = random.Random(seed + block)
            started, due, tasks = clock(), 0.0, []
            for i in indices:
                due += gaps.expovariate(rate)
                await asyncio.sleep(max(0.0, started + due - clock()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        else:
            queue = list(indices)[::-1]

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(worker() for _ in range(max(1, concurrency or 1))))
    return sorted(timings, key=lambda t: t.index)


def make_clock() -> Callable[[], float]:
    origin = time.perf_counter()
    return lambda: time.perf_counter() - origin
