"""Do stored Responses slow the token streams beside them? Chat streams' TTFT and ITL under a load of Responses.

A Response created with `store: true` (the default) is committed to SQLite (WAL, synchronous=FULL: an fsync)
before the client sees it. Where that write blocks the server's event loop, every stream the server is sending
meanwhile stalls for it. This measures that from outside, against `python -m jarvis serve` (llama.cpp, the
embedded gemma-3-270m, default settings but --parallel contexts), in two modes per server:

  load     an open loop of POST /v1/responses at --rate per second ("Say hi", --load-tokens output tokens,
           temperature 0, `store` true or false: the mode), each sent on schedule whether or not the earlier
           ones finished; the 200s that come while the streams run give the responses stored per second.
  streams  after --warmup seconds of load, --streams clients each stream chat completions back to back
           (--max-tokens, greedy, ignore_eos where the server accepts it) until the load's --duration ends:
           TTFT (send to first content chunk) and ITL (gaps between successive content chunks).

The goal: ITL p99 with store=true within 1.1x of store=false. Each round measures every server in both modes,
the order reversed every other round, so slow drifts fall on each alike. Servers (this checkout, and with
--before DIR another, e.g. `git worktree add /tmp/before HEAD`) start up front with the same settings.
--parallel is llama.cpp's contexts, streams + 2 by default: with the engine's default of one, streams and
responses take the context in turns, so hardly a write falls between two tokens of a stream. A small machine
will not serve 50 responses/s beside 8 streams: the rate achieved is reported, and the answers not 200.

    python bench/store_load.py [--before DIR] [--this DIR] [--rounds R] [--duration S] [--warmup S] [--drain S]
                               [--rate N] [--load-tokens N] [--streams N] [--max-tokens N] [--parallel N]
                               [--api-keys] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import checkout_env, jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"
PROMPT = "Write a long story about a lighthouse keeper and the sea."
GOAL = 1.1  # ITL p99 store=true / store=false


@dataclass
class Target:
    name: str
    base_url: str
    headers: dict[str, str]
    ignore_eos: bool = False


@dataclass
class Phase:
    """One server in one mode for one round: the load's answers and the streams' samples."""

    target: str
    store: bool
    round: int
    sent: int = 0
    ok_at_s: list[float] = field(default_factory=list)  # when each 200 came, from the load's start
    answers: dict[str, int] = field(default_factory=dict)
    stream_errors: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def chat_body(target: Target, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **({"ignore_eos": True} if target.ignore_eos else {})}


async def post_response(client: httpx.AsyncClient, target: Target, phase: Phase, tokens: int, start: float) -> None:
    body = {"model": MODEL, "input": "Say hi", "max_output_tokens": tokens, "temperature": 0, "store": phase.store}
    try:
        response = await client.post(f"{target.base_url}/responses", json=body, headers=target.headers)
        answer = str(response.status_code)
        if response.status_code == 200:
            phase.ok_at_s.append(round(time.perf_counter() - start, 4))
    except httpx.HTTPError as exc:
        answer = type(exc).__name__
    phase.answers[answer] = phase.answers.get(answer, 0) + 1


async def stream_loop(client: httpx.AsyncClient, target: Target, phase: Phase, max_tokens: int) -> None:
    """Chat streams back to back, each chunk's time recorded as it comes (the caller cancels at the window's end)."""
    while True:
        sent, last = time.perf_counter(), None
        try:
            async with client.stream("POST", f"{target.base_url}/chat/completions", headers=target.headers,
                                     json=chat_body(target, max_tokens, stream=True)) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            phase.ttft_ms.append((now - sent) * 1e3)
                        else:
                            phase.itl_ms.append((now - last) * 1e3)
                        last = now
        except (httpx.HTTPError, ValueError):  # ValueError: an event that is not JSON
            phase.stream_errors += 1
            await asyncio.sleep(0.1)


async def run_phase(target: Target, phase: Phase, args: argparse.Namespace) -> None:
    """The load for --duration seconds with the streams in its last (duration - warmup) seconds."""
    unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=unlimited) as load_client, \
            httpx.AsyncClient(timeout=120, limits=unlimited) as stream_client:
        start = time.perf_counter()
        end = start + args.duration
        posts: list[asyncio.Task[None]] = []
        streams: list[asyncio.Task[None]] = []
        while (due := start + phase.sent / args.rate) < end:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            posts.append(asyncio.create_task(post_response(load_client, target, phase, args.load_tokens, start)))
            phase.sent += 1
            if not streams and time.perf_counter() >= start + args.warmup:
                streams = [asyncio.create_task(stream_loop(stream_client, target, phase, args.max_tokens))
                           for _ in range(args.streams)]
        for task in streams:
            task.cancel()
        _, unfinished = await asyncio.wait(posts, timeout=args.drain)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*streams, *unfinished, return_exceptions=True)
        if unfinished:
            phase.answers["unfinished"] = len(unfinished)
        # the server's queue is drained when a 1-token request gets through
        await stream_client.post(f"{target.base_url}/chat/completions", headers=target.headers,
                                 json=chat_body(target, 1, stream=False))


async def prepare(target: Target) -> None:
    """Whether the server takes vLLM's ignore_eos; a warm-up of both endpoints."""
    async with httpx.AsyncClient(timeout=120) as client:
        probe = chat_body(Target(target.name, target.base_url, target.headers, ignore_eos=True), 2, stream=False)
        reply = await client.post(f"{target.base_url}/chat/completions", json=probe, headers=target.headers)
        target.ignore_eos = reply.status_code == 200
        for store in (True, False):
            reply = await client.post(f"{target.base_url}/responses", headers=target.headers, json={
                "model": MODEL, "input": "Say hi", "max_output_tokens": 1, "store": store})
            reply.raise_for_status()


async def measure(targets: list[Target], args: argparse.Namespace, console: Console) -> list[Phase]:
    for target in targets:
        await prepare(target)
    order = [(target, store) for target in targets for store in (True, False)]
    phases = []
    for r in range(args.rounds):
        for target, store in order if r % 2 == 0 else order[::-1]:
            phase = Phase(target.name, store, r)
            with console.status(f"round {r + 1}/{args.rounds}: {target.name}, store={store} ..."):
                await run_phase(target, phase, args)
            phases.append(phase)
    return phases


def summarize(phases: list[Phase], args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name in dict.fromkeys(p.target for p in phases):
        for store in (True, False):
            mine = [p for p in phases if p.target == name and p.store == store]
            ttft, itl = [x for p in mine for x in p.ttft_ms], [x for p in mine for x in p.itl_ms]
            answers: dict[str, int] = {}
            for p in mine:
                for answer, n in p.answers.items():
                    answers[answer] = answers.get(answer, 0) + n
            summary.setdefault(name, {})[f"store={str(store).lower()}"] = {
                "sent_per_s": sum(p.sent for p in mine) / (len(mine) * args.duration),
                "ok_per_s": sum(args.warmup <= t <= args.duration for p in mine for t in p.ok_at_s)
                / (len(mine) * (args.duration - args.warmup)),
                "not_200": sum(n for answer, n in answers.items() if answer != "200"), "answers": answers,
                "streams": len(ttft), "stream_errors": sum(p.stream_errors for p in mine), "itl_samples": len(itl),
                "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99)}
    return summary


def print_report(console: Console, summary: dict, args: argparse.Namespace, targets: list[Target],
                 config: dict[str, Any]) -> None:
    table = Table(title=f"Chat streams under {args.rate:g} Responses/s (store true vs false), "
                        f"{args.rounds} round(s) of {args.duration:g} s")
    for column in ["server", "store", "responses 200/s", "not 200", "streams", "TTFT p50", "TTFT p99",
                   "ITL p50", "ITL p99", "ITL p99 ratio", "TTFT p99 ratio"]:
        table.add_column(column, justify="left" if column in ("server", "store") else "right")
    for name, modes in summary.items():
        on, off = modes["store=true"], modes["store=false"]
        itl_ratio, ttft_ratio = (on[k] / off[k] if off[k] else math.nan for k in ("itl_p99_ms", "ttft_p99_ms"))
        for mode, s in modes.items():
            ratios = ([f"[{'green' if itl_ratio <= GOAL else 'red'}]{itl_ratio:.2f}x", f"{ttft_ratio:.2f}x"]
                      if mode == "store=true" else ["", ""])
            times = [f"{s[k]:.0f}" for k in ("ttft_p50_ms", "ttft_p99_ms")] + [
                f"{s[k]:.1f}" for k in ("itl_p50_ms", "itl_p99_ms")]
            table.add_row(name, mode.removeprefix("store="), f"{s['ok_per_s']:.1f} / {s['sent_per_s']:.0f}",
                          str(s["not_200"]), str(s["streams"]), *times, *ratios)
        modes["ratios"] = {"itl_p99": itl_ratio, "ttft_p99": ttft_ratio}
    console.print(table)
    console.print(f"Times in ms. {args.streams} streams of {args.max_tokens} tokens (ignore_eos: "
                  f"{', '.join(f'{t.name} {t.ignore_eos}' for t in targets)}); ratios are store=true / store=false, "
                  f"goal ITL p99 ≤ {GOAL}x. responses 200/s: completed while the streams ran / sent per second; "
                  f"streams: those whose first token came then. {args.parallel} llama.cpp contexts; load average "
                  f"before/after: {config['load_before']:.2f} / {config['load_after']:.2f} on {config['cpu_count']} "
                  "cores.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to measure too (e.g. a git worktree)")
    parser.add_argument("--this", type=Path, help="the checkout named 'this' (default: the installed one)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every server in both modes (3)")
    parser.add_argument("--duration", type=float, default=12, help="seconds of load per server and mode (12)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before the streams start (2)")
    parser.add_argument("--drain", type=float, default=5, help="seconds the load's last answers may take (5)")
    parser.add_argument("--rate", type=float, default=50, help="POST /v1/responses per second (50)")
    parser.add_argument("--load-tokens", type=int, default=1, help="max_output_tokens of each response (1)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent chat streams (8)")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each chat stream (48)")
    parser.add_argument("--parallel", type=int, help="JARVIS_LLAMA_N_PARALLEL: llama.cpp contexts (streams + 2)")
    parser.add_argument("--api-keys", action="store_true", help="JARVIS_API_KEYS=bench-a,bench-b; send bench-a")
    parser.add_argument("--out", type=Path, default=Path("jarvis-reports"))
    args = parser.parse_args()
    args.parallel = args.parallel or args.streams + 2

    console = Console(width=max(Console().width, 140))
    settings = {"JARVIS_LLAMA_N_PARALLEL": str(args.parallel)}
    settings |= {"JARVIS_API_KEYS": "bench-a,bench-b"} if args.api_keys else {}
    headers = {"Authorization": "Bearer bench-a"} if args.api_keys else {}
    checkouts = {"this": args.this, **({"before": args.before} if args.before else {})}
    with tempfile.TemporaryDirectory() as workdir, ExitStack() as stack:
        targets = []
        with console.status(f"starting {', '.join(checkouts)} ..."):
            for name, checkout in checkouts.items():
                env = checkout_env(checkout.resolve() if checkout else None, Path(workdir) / name)
                base_url = stack.enter_context(jarvis_server(180, **settings, **env))
                targets.append(Target(name, base_url, headers))
        load_before = os.getloadavg()[0]
        phases = asyncio.run(measure(targets, args, console))
    config = {**vars(args), "cpu_count": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()[0]}
    summary = summarize(phases, args)
    print_report(console, summary, args, targets, config)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "store_load.json"
    out.write_text(json.dumps({"config": config, "ignore_eos": {t.name: t.ignore_eos for t in targets},
                               "summary": summary, "phases": [asdict(p) for p in phases]}, indent=2, default=str))
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
