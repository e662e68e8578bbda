"""`jarvis bench`: one or two OpenAI-compatible targets under load, level by level, with resource samples.

Each load level (a concurrency, or a Poisson request rate) sends the same
`requests` prompts to every target. With two targets (`--compare`) a level is
split into `rounds` blocks that alternate between them (A B, then B A, ...),
so slow drift on a shared machine hurts both alike; each target's wall time
is the sum of its own blocks. The result holds every raw request timing.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jarvis.plugins.evaluation.bench_load import RequestTiming, Target, make_clock, run_block, summarise
from jarvis.plugins.evaluation.resource_sampler import ResourceSampler

console = Console(stderr=True)


def split_blocks(n: int, rounds: int) -> list[list[int]]:
    rounds = max(1, min(rounds, n))
    size, extra = divmod(n, rounds)
    out, start = [], 0
    for r in range(rounds):
        end = start + size + (1 if r < extra else 0)
        out.append(list(range(start, end)))
        start = end
    return out


async def warm_up(targets: Sequence[Target], prompts: Sequence[str], max_tokens: int, count: int) -> None:
    clock = make_clock()
    for target in targets:
        if count:
            await run_block(target, prompts, list(range(count)), max_tokens=max_tokens, concurrency=1, rate=None,
                            seed=0, clock=clock, block=-1)


def run_benchmark(targets: Sequence[Target], prompts: Sequence[str], *, requests: int,
                  concurrencies: Sequence[int] | None = None, rates: Sequence[float] | None = None,
                  max_tokens: int = 64, seed: int = 0, rounds: int | None = None, warmup: int = 1,
                  sample_interval: float = 0.25) -> dict[str, Any]:
    levels: list[tuple[str, float]] = ([("rate", r) for r in rates] if rates else
                                       [("concurrency", c) for c in (concurrencies or [1])])
    rounds = rounds or (2 if len(targets) > 1 else 1)
    asyncio.run(warm_up(targets, prompts, max_tokens, warmup))
    clock = make_clock()
    results: list[dict[str, Any]] = []
    with ResourceSampler(clock, sample_interval) as sampler, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True) as bar:
        for mode, value in levels:
            task = bar.add_task(f"{mode} {value:g}", total=requests * len(targets))
            per_target: dict[str, list[RequestTiming]] = {t.label: [] for t in targets}
            level_start = clock()
            block_no = 0
            for r, indices in enumerate(split_blocks(requests, rounds)):
                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                for target in order:
                    timings = asyncio.run(run_block(
                        target, prompts, indices, max_tokens=max_tokens,
                        concurrency=int(value) if mode == "concurrency" else None,
                        rate=value if mode == "rate" else None, seed=seed, clock=clock, block=block_no,
                        on_done=lambda task=task: bar.advance(task)))
                    per_target[target.label].extend(timings)
                    block_no += 1
            level_end = clock()
            for target in targets:
                timings = per_target[target.label]
                results.append({"target": target.label, "mode": mode, mode: value,
                                "summary": summarise(timings),
                                "resources": sampler.summary(level_start, level_end),
                                "raw": [t.to_dict() for t in timings]})
        overall = sampler.summary()
        samples = sampler.samples
    return {
        "kind": "bench", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": [{"label": t.label, "url": t.url, "model": t.model, "chat": t.chat} for t in targets],
        "settings": {"requests": requests, "max_tokens": max_tokens, "seed": seed, "rounds": rounds,
                     "warmup": warmup, "prompts": len(prompts),
                     "levels": [{"mode": m, "value": v} for m, v in levels]},
        "client": {"host": platform.node(), "python": platform.python_version()},
        "runs": results, "resources": overall, "resource_samples": samples,
        "comparison": compare_targets(results, [t.label for t in targets]) if len(targets) > 1 else None,
    }


def compare_targets(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """second ÷ first for throughput, tokens/s, latency p50/p95 and TTFT p50, per load level."""
    first, second = labels[0], labels[1]
    out = []
    levels = [(r["mode"], r[r["mode"]]) for r in runs if r["target"] == first]
    for mode, value in levels:
        a = next(r["summary"] for r in runs if r["target"] == first and r["mode"] == mode and r[mode] == value)
        b = next(r["summary"] for r in runs if r["target"] == second and r["mode"] == mode and r[mode] == value)

        def ratio(x: float | None, y: float | None) -> float | None:
            return y / x if x and y is not None else None

        out.append({"mode": mode, mode: value, "of": f"{second} / {first}",
                    "request_throughput": ratio(a["request_throughput"], b["request_throughput"]),
                    "output_tokens_per_s": ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]),
                    "latency_p50": ratio(a["latency_s"]["p50"], b["latency_s"]["p50"]),
                    "latency_p95": ratio(a["latency_s"]["p95"], b["latency_s"]["p95"]),
                    "ttft_p50": ratio(a["ttft_s"]["p50"], b["ttft_s"]["p50"])})
    return out
