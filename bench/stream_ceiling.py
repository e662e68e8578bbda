"""How many streamed tokens a second can Jarvis's server process carry when a batching engine hands it a row per
request each step? The API process's ceiling under C concurrent streams, with no model in the way.

A batching engine (the hf waves, vLLM in process) produces one token for each of C requests per step and hands
them to the event loop together; the loop then writes C SSE events while the engine runs its next step. Both
share one process and one GIL, so the serving path's cost per chunk and the engine's host time per step show
up as a longer step. Here the engine is a stepping thread with no model: each step sleeps `--step-ms` with the
GIL released (what a GPU step costs the host), spins `--host-us` per row holding it (the scheduler's own
Python per row: sampling, detokenizing, emitting), then emits a chunk to every running request in one
`batched_emits` block, as the hf waves do.

  jarvis  `create_app` with the default plugins (telemetry included), under uvicorn as `jarvis serve` runs it;
          the engine is the llama.cpp engine (its tokenizer and model info, the embedded model) whose
          `stream` takes its tokens from the stepping thread: the request goes through the whole serving
          path (body, prompt, runtime, render, routes, middleware).
  floor   a bare Litestar app under uvicorn whose handler streams one prebuilt event per token from the same
          stepping thread: what any Python server pays for the hand-off and the socket.

A closed loop of C clients (raw sockets, uvloop, in this process) keeps C streams of `--tokens` tokens open for
`--seconds`. Reported per side: chunks a second, the step's wall time against the configured step (the excess
is what the process's Python cost the engine), and CPU microseconds per chunk of the event-loop thread and of
the stepping thread (/proc/PID/task/TID/schedstat). jarvis / floor is the ratio of chunks a second. Sides take
turns round by round. --before DIR adds another checkout's Jarvis (e.g. `git worktree add /tmp/before HEAD`).

    python bench/stream_ceiling.py [--concurrency 16,64] [--step-ms 2] [--host-us 19] [--tokens 128]
                                   [--seconds 10] [--rounds 2] [--before DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar, get, post
from litestar.response import Stream
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import checkout_env, wait_ready  # noqa: E402
from stream_overhead import isolated_env, thread_cpu_ns  # noqa: E402

EVENT = "data: " + json.dumps({"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
                               "choices": [{"index": 0, "text": " word", "finish_reason": None, "logprobs": None}],
                               "usage": None}, separators=(",", ":")) + "\n\n"


class Stepper:
    """A batching engine without a model: every step, `step_s` with the GIL released, `host_s` per row holding
    it, then one call `deliver(rows)` for the running rows (each a [sink, tokens left, tokens asked])."""

    def __init__(self, step_s: float, host_s: float, deliver: Callable[[list[list[Any]]], None]) -> None:
        self.step_s, self.host_s, self.deliver = step_s, host_s, deliver
        self.rows: list[list[Any]] = []
        self.lock = threading.Lock()
        self.steps = self.stepped_rows = 0
        threading.Thread(target=self._run, name="stepper", daemon=True).start()

    def add(self, sink: Any, tokens: int) -> None:
        with self.lock:
            self.rows.append([sink, tokens, tokens])

    def _run(self) -> None:
        while True:
            time.sleep(self.step_s)
            with self.lock:
                rows = list(self.rows)
            if not rows:
                continue
            spin_until = time.perf_counter() + self.host_s * len(rows)
            while time.perf_counter() < spin_until:
                pass
            for row in rows:
                row[1] -= 1
            self.deliver(rows)
            with self.lock:
                self.rows = [row for row in self.rows if row[1] > 0]
            self.steps += 1
            self.stepped_rows += len(rows)


def jarvis_app(step_s: float, host_s: float) -> tuple[Any, Stepper]:
    from jarvis import hookimpl
    from jarvis.app import create_app
    from jarvis.backends.llama_cpp.engine import LlamaCppEngine
    from jarvis.bootstrap import bootstrap
    from jarvis.engine import GenerationChunk, PreparedRequest, WorkerRelay, batched_emits
    from jarvis.plugin_manager import create_plugin_manager

    def deliver(rows: list[list[Any]]) -> None:
        with batched_emits():
            for relay, left, asked in rows:
                relay.emit(GenerationChunk(text=" word", token_count=1) if left > 0 else GenerationChunk(
                    text=" word", token_count=1, finish_reason="length", prompt_tokens=8, completion_tokens=asked))

    stepper = Stepper(step_s, host_s, deliver)

    class SteppedLlamaCpp(LlamaCppEngine):
        async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
            relay = WorkerRelay()
            stepper.add(relay, request.max_tokens or 1)
            async for chunk in relay.chunks():
                yield chunk

    class SteppedPlugin:
        @hookimpl
        def jarvis_register_engines(self, register: Any) -> None:
            register("llama_cpp_stepped", SteppedLlamaCpp)

    plugins = create_plugin_manager()
    plugins.register(SteppedPlugin(), name="stepped-llama-cpp")
    return create_app(bootstrap(plugins=plugins)), stepper


def floor_app(step_s: float, host_s: float) -> tuple[Any, Stepper]:
    def deliver(rows: list[list[Any]]) -> None:
        by_loop: dict[Any, list[tuple[asyncio.Queue, str | None]]] = {}
        for (loop, queue), left, _ in rows:
            by_loop.setdefault(loop, []).append((queue, EVENT if left > 0 else None))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(lambda items=items: [q.put_nowait(e) for q, e in items])

    stepper = Stepper(step_s, host_s, deliver)

    @post("/v1/completions", status_code=200)
    async def completions(data: dict[str, Any]) -> Stream:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        stepper.add((asyncio.get_running_loop(), queue), data["max_tokens"])

        async def events() -> AsyncIterator[str]:
            while (event := await queue.get()) is not None:
                yield event
            yield EVENT
            yield "data: [DONE]\n\n"

        return Stream(events(), media_type="text/event-stream")

    @get("/health")
    async def health() -> dict[str, str]:  # what wait_ready polls, as Jarvis answers it
        return {"status": "ready"}

    return Litestar([completions, health]), stepper


def serve(side: str, port: int, step_ms: float, host_us: float, stats_file: Path) -> None:
    """In the server subprocess: the side's app under uvicorn, its stepper's counters written every 0.5 s."""
    import uvicorn

    def run(app: Any, stepper: Stepper) -> None:
        def report() -> None:
            while True:
                stats_file.write_text(json.dumps({"steps": stepper.steps, "rows": stepper.stepped_rows,
                                                  "at": time.monotonic(), "stepper_tid": stepper_tid}))
                time.sleep(0.5)

        stepper_tid = next(t.native_id for t in threading.enumerate() if t.name == "stepper")
        threading.Thread(target=report, daemon=True).start()
        uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)).run()

    if side == "floor":
        run(*floor_app(step_ms / 1000, host_us / 1e6))
        return
    with isolated_env(JARVIS_INFERENCE_ENGINE="llama_cpp_stepped", JARVIS_LLAMA_N_THREADS="1"):
        run(*jarvis_app(step_ms / 1000, host_us / 1e6))


class Server:
    """A side's server subprocess (started by `__enter__`, ready when it answers)."""

    def __init__(self, side: str, env: dict[str, str], args: argparse.Namespace, workdir: Path) -> None:
        self.side, self.env, self.args = side, env, args
        self.stats_file = workdir / f"{side}-stats.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = workdir / f"{side}.log"

    def __enter__(self) -> Server:
        kind = "floor" if self.side == "floor" else "jarvis"
        self.log_file = open(self.log, "w+")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, str(self.port), str(self.args.step_ms), str(self.args.host_us),
             str(self.stats_file)], env={**os.environ, **self.env}, stdout=self.log_file, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url(""), self.process, self.log_file, timeout_s=300)
        except BaseException:
            self.__exit__()
            raise
        self.model = "m" if self.side == "floor" else httpx.get(self.url("/v1/models")).json()["data"][0]["id"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log_file.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, Any]:
        return json.loads(self.stats_file.read_text())


async def closed_loop(port: int, model: str, concurrency: int, tokens: int, seconds: float) -> tuple[int, int, float]:
    """C clients, each streaming one completion after another until `seconds` pass: events and requests read."""
    body = json.dumps({"model": model, "prompt": "Say a word.", "max_tokens": tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    counts = [0, 0]
    stop = time.monotonic() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                writer.write(head + body)
                tail = b""
                while b"[DONE]" not in tail:
                    data = await reader.read(65536)
                    if not data:
                        raise RuntimeError("the server closed the connection mid-stream")
                    if b"HTTP/1.1 4" in data or b"HTTP/1.1 5" in data:
                        raise RuntimeError(f"the server refused a stream: {data[:300]!r}")
                    counts[0] += data.count(b"data: {")
                    tail = tail[-16:] + data
                    if b"[DONE]" in tail:  # the next response's head may follow on a kept-alive connection
                        break
                counts[1] += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return counts[0], counts[1], time.monotonic() - started


def run_loop(server: Server, concurrency: int, tokens: int, seconds: float) -> tuple[int, int, float]:
    try:  # the client's own cost stays small beside the server's
        import uvloop
    except ImportError:
        return asyncio.run(closed_loop(server.port, server.model, concurrency, tokens, seconds))
    return uvloop.run(closed_loop(server.port, server.model, concurrency, tokens, seconds))


def measure(server: Server, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    run_loop(server, concurrency, args.tokens, 2)  # warm-up
    cpu0, stats0 = thread_cpu_ns(server.process.pid), server.stats()
    events, requests, wall = run_loop(server, concurrency, args.tokens, args.seconds)
    time.sleep(0.6)  # the stepper's counters are written every 0.5 s
    cpu1, stats1 = thread_cpu_ns(server.process.pid), server.stats()
    steps = stats1["steps"] - stats0["steps"]
    cpu = {tid: (ns - cpu0.get(tid, 0)) / 1e3 for tid, ns in cpu1.items()}
    stepper = cpu.pop(stats1["stepper_tid"], 0.0)
    loop_us = cpu.pop(server.process.pid, 0.0)  # the main thread runs the event loop
    return {"chunks_per_s": events / wall, "requests": requests, "events": events,
            "step_ms": 1e3 * (stats1["at"] - stats0["at"]) / max(steps, 1),
            "rows_per_step": (stats1["rows"] - stats0["rows"]) / max(steps, 1),
            "loop_us_per_chunk": loop_us / max(events, 1), "stepper_us_per_chunk": stepper / max(events, 1),
            "other_us_per_chunk": sum(cpu.values()) / max(events, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="16,64", help="streams at once, comma-separated (16,64)")
    parser.add_argument("--step-ms", type=float, default=2.0, help="the step's time with the GIL released (2 ms: "
                        "a 64-row step of Gemma-3-270M on an H100)")
    parser.add_argument("--host-us", type=float, default=19.0, help="the engine's Python per row and step, holding "
                        "the GIL (19 us: the hf waves' 1.2 ms for 64 rows on that host)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (128)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each measurement's length (10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, sides taking turns (2)")
    parser.add_argument("--before", type=Path, help="another checkout's Jarvis as a third side")
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.serve:
        side, port, step_ms, host_us, stats_file = args.serve
        serve(side, int(port), float(step_ms), float(host_us), Path(stats_file))
        return

    console = Console(width=max(Console().width, 120))
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        envs: dict[str, dict[str, str]] = {"floor": {}, "jarvis": {}}
        if args.before is not None:
            envs["before"] = checkout_env(args.before.resolve(), Path(workdir) / "before")
        for round_ in range(args.rounds):
            for side, env in (envs.items() if round_ % 2 == 0 else reversed(envs.items())):
                with console.status(f"round {round_ + 1}/{args.rounds}: {side} at C={args.concurrency} ..."), \
                        Server(side, env, args, Path(workdir)) as server:
                    for c in levels:
                        results.setdefault(side, {}).setdefault(c, []).append(measure(server, c, args))
    print_report(console, args, levels, results)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "stream_ceiling.json"
    out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items() if k != "serve"} |
                               {"cpu_count": os.cpu_count()}, "results": results}, indent=2))
    console.print(f"results: {out}")


def print_report(console: Console, args: argparse.Namespace, levels: list[int],
                 results: dict[str, dict[int, list[dict]]]) -> None:
    table = Table(title=f"Streamed chunks a second through the server process: a {args.step_ms:g} ms step (GIL "
                        f"released) + {args.host_us:g} us of engine Python per row, {args.tokens} tokens a request, "
                        f"median of {args.rounds} round(s)")
    for column in ("side", "C", "chunks/s", "× floor", "step ms", "rows/step", "loop µs/chunk", "engine µs/chunk"):
        table.add_column(column, justify="right")

    def median(side: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in results[side][c])

    for c in levels:
        for side in results:
            rate = median(side, c, "chunks_per_s")
            table.add_row(side, str(c), f"{rate:,.0f}", f"{rate / median('floor', c, 'chunks_per_s'):.3f}",
                          f"{median(side, c, 'step_ms'):.2f}", f"{median(side, c, 'rows_per_step'):.1f}",
                          f"{median(side, c, 'loop_us_per_chunk'):.1f}",
                          f"{median(side, c, 'stepper_us_per_chunk'):.1f}")
    console.print(table)
    ideal = args.step_ms + args.host_us * max(levels) / 1e3
    console.print(f"With no serving cost a step of {max(levels)} rows would take {ideal:.2f} ms; the excess is the "
                  f"serving path's Python and the hand-off, taken from the engine's step through the GIL. "
                  f"{os.cpu_count()} CPUs; the client runs in this process.")


if __name__ == "__main__":
    main()
