"""What does Jarvis's streaming path cost per chunk? The host (Python) work from an engine's chunk to SSE bytes.

Jarvis streams /v1/completions and /v1/chat/completions (stream=true, as `vllm bench serve` drives them)
through the runtime, the serving layer, the route, the plugins (telemetry) and Litestar. This measures
that work per streamed chunk, apart from the engine's, with the default plugins (telemetry included) and
the embedded gemma-3-270m on llama.cpp, greedy, ignore_eos (every completion has exactly its max_tokens):

  path    the Jarvis app (`create_app`: plugins, routes, serving, runtime, Litestar) with its ASGI interface
          called directly (no socket), serving llama.cpp's own chunks replayed: each request is decoded by
          llama.cpp once, then its chunks come back at once, one per event-loop turn (as vLLM's AsyncLLM
          hands them over). CPU time per request of a short and a long one: the difference per extra
          chunk is Jarvis's Python per chunk (no engine, no socket), the rest its cost per request. The
          minimum over --repeats and --rounds, steady enough to compare before and after.
  server  `python -m jarvis serve` (one llama.cpp context) streaming over 127.0.0.1 to an httpx client.
          CPU time of each server thread (/proc/PID/task/TID/schedstat): the event-loop thread (Jarvis,
          Litestar, uvicorn, the kernel's socket writes) and the engine's threads (llama.cpp's decode and
          its worker's Python), per chunk: the slope between short and long requests (per-request work
          drops out).
  floor   a bare Litestar app under uvicorn (`floor_app` here) streaming one prebuilt event per chunk,
          handed over from a worker thread at the server's pace: what any Python server pays per chunk on
          this machine (the hand-off, the socket write). server - floor is Jarvis's part, run cold: at
          tens of tokens per second its code is out of the CPU caches at every chunk, so it exceeds `path`.

Servers take turns request by request, so load that comes and goes falls on each alike. --before DIR adds
the same measurements of another checkout (e.g. `git worktree add /tmp/before HEAD`), interleaved with this
one: a before/after comparison in one run. --profile adds cProfile's view of the path: the functions with
the most own time per chunk (cProfile inflates every Python call: read it for proportions).

    python bench/stream_overhead.py [--before DIR] [--repeats N] [--rounds R] [--path-long P]
                                    [--requests R] [--short S] [--long L] [--threads T]
                                    [--skip-server] [--profile] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar, post
from litestar.response import Stream
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import checkout_env, jarvis_server  # noqa: E402
from proxy_overhead import llama_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def request_body(endpoint: str, max_tokens: int) -> dict[str, Any]:
    """A streamed request that generates exactly `max_tokens` tokens, with usage at the end (as vLLM's bench)."""
    body: dict[str, Any] = {"model": "gemma-3-270m", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return body


def per_chunk(short: tuple[float, int], long: tuple[float, int]) -> tuple[float, float]:
    """(µs per chunk, µs per request) from (seconds, chunks) of short and long requests."""
    chunk_s = (long[0] - short[0]) / (long[1] - short[1])
    return chunk_s * 1e6, (short[0] - chunk_s * short[1]) * 1e6


# --- path: the app in process, llama.cpp's chunks replayed ------------------------------------------


def replay_plugin() -> Any:
    """A plugin registering `llama_cpp_replayed`: the llama.cpp engine (model, tokenizer, chat format, first
    decode all real) whose repeated requests replay the chunks of their first decode without decoding."""
    from jarvis import hookimpl
    from jarvis.backends.llama_cpp.engine import LlamaCppEngine
    from jarvis.engine import GenerationChunk

    class ReplayedLlamaCpp(LlamaCppEngine):
        def __init__(self, settings: Any) -> None:
            super().__init__(settings)
            self.recorded: dict[tuple, list[GenerationChunk]] = {}

        async def stream(self, request: Any) -> AsyncIterator[GenerationChunk]:
            key = (tuple(request.prompt_token_ids or ()), request.max_tokens, request.ignore_eos, tuple(request.stop))
            if key not in self.recorded:
                self.recorded[key] = [chunk async for chunk in super().stream(request)]
            for c in self.recorded[key]:
                await asyncio.sleep(0)  # one chunk per loop turn, as an engine's queue hands them over
                yield GenerationChunk(text=c.text, token_count=c.token_count, finish_reason=c.finish_reason,
                                      prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)

    class ReplayPlugin:
        @hookimpl
        def jarvis_register_engines(self, register: Any) -> None:
            register("llama_cpp_replayed", ReplayedLlamaCpp)

    return ReplayPlugin()


@contextmanager
def isolated_env(**settings: str) -> Iterator[None]:
    """Only `settings` among the JARVIS_* variables (and JARVIS_DATA_DIR), in a folder with no .env."""
    saved, cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory() as workdir:
        for key in [k for k in os.environ if k.startswith("JARVIS_") and k != "JARVIS_DATA_DIR"]:
            del os.environ[key]
        os.environ.update({"JARVIS_STATE_DIR": str(Path(workdir) / "state"), "JARVIS_LOG_LEVEL": "warning",
                           **settings})
        os.chdir(workdir)
        try:
            yield
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved)


class AsgiClient:
    """Calls an ASGI app in this event loop: its lifespan, and POSTs whose response body is collected."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AsgiClient]:
        inbox: asyncio.Queue[dict] = asyncio.Queue()
        started = asyncio.Event()

        async def send(message: dict) -> None:
            if message["type"].startswith("lifespan.startup"):
                started.set()

        inbox.put_nowait({"type": "lifespan.startup"})
        task = asyncio.create_task(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                            inbox.get, send))
        await started.wait()
        try:
            yield self
        finally:
            inbox.put_nowait({"type": "lifespan.shutdown"})
            await task

    async def post(self, path: str, body: dict[str, Any]) -> bytes:
        raw = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
        request = [{"type": "http.request", "body": raw, "more_body": False}]
        done = asyncio.Event()
        parts: list[bytes] = []

        async def receive() -> dict:
            if request:
                return request.pop()
            await done.wait()  # then the client "disconnects", as uvicorn says once a response is complete
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    done.set()

        await self.app(scope, receive, send)
        return b"".join(parts)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed, as uvicorn's default (loop="auto") picks it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def measure_path(data_dir: Path, threads: int, short: int, long: int, repeats: int, profile: bool) -> dict:
    """In this process: per endpoint, the least CPU seconds of a short and of a long request, their chunks,
    and with `profile` cProfile's top functions of the long requests."""
    from jarvis.app import create_app
    from jarvis.bootstrap import bootstrap
    from jarvis.plugin_manager import create_plugin_manager

    results: dict[str, dict] = {}

    async def run() -> None:
        pm = create_plugin_manager()
        pm.register(replay_plugin(), name="replayed-llama-cpp")
        app = create_app(bootstrap(plugins=pm))
        async with AsgiClient(app).running() as client:
            while not app.state.jarvis.runtime.ready:
                await asyncio.sleep(0.05)
            for endpoint in ENDPOINTS:
                for n in (short, long):  # llama.cpp decodes each once; later requests replay it
                    await client.post(endpoint, request_body(endpoint, n))
                least, chunks = {short: float("inf"), long: float("inf")}, {}
                for _ in range(repeats):
                    for n in (short, long):
                        started = time.thread_time()
                        body = await client.post(endpoint, request_body(endpoint, n))
                        least[n] = min(least[n], time.thread_time() - started)
                        chunks[n] = body.count(b"data: ")
                results[endpoint] = {"least_s": least, "chunks": chunks}
            for endpoint in ENDPOINTS if profile else ():  # after every measurement: profiling slows what follows
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(repeats):
                    await client.post(endpoint, request_body(endpoint, long))
                profiler.disable()
                results[endpoint]["profile"] = top_functions(profiler, repeats * results[endpoint]["chunks"][long])

    settings = {k: v for k, v in llama_settings(data_dir, threads).items() if k != "JARVIS_DATA_DIR"}
    with isolated_env(JARVIS_DATA_DIR=str(data_dir), JARVIS_INFERENCE_ENGINE="llama_cpp_replayed", **settings):
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(run())
    return results


def top_functions(profiler: cProfile.Profile, chunks: int, count: int = 25) -> list[tuple[str, float, int]]:
    """(function, own µs per chunk, calls per 100 chunks) of the functions with the most own time."""
    rows = []
    for (filename, line, name), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore
        where = re.sub(r".*/(site-packages|python3\.\d+)/", "", filename).removeprefix(f"{ROOT}/")
        rows.append((f"{where}:{line}({name})", own / chunks * 1e6, round(calls / chunks * 100)))
    return sorted(rows, key=lambda r: -r[1])[:count]


def path_in_subprocess(env: dict[str, str], args: argparse.Namespace, profile: bool) -> dict:
    """`measure_path` in a fresh interpreter whose `jarvis` is the one `env` points at."""
    command = [sys.executable, __file__, "--path-worker", "--threads", str(args.threads), "--short", str(args.short),
               "--path-long", str(args.path_long), "--repeats", str(args.repeats), *(["--profile"] if profile else [])]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the path measurement failed:\n{done.stderr[-5000:]}")
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


# --- server and floor: real processes, CPU time per thread --------------------------------------------


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of `pid` has run (the first field of /proc/PID/task/TID/schedstat)."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            times[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError):  # the thread ended meanwhile
            pass
    return times


def child_serving(port: int) -> int:
    """The pid of this process's child started with JARVIS_PORT or --port `port`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and (f"JARVIS_PORT={port}".encode() in environ or str(port).encode() in cmdline):
            return int(entry.name)
    raise RuntimeError(f"no child process serves port {port}")


@dataclass
class Target:
    """A running server: its process, and what to POST where for each of its endpoints."""

    name: str
    pid: int
    url: Callable[[str], str]
    body: Callable[[str, int], dict[str, Any]]
    endpoints: tuple[str, ...]


def jarvis_target(stack: ExitStack, name: str, data_dir: Path, threads: int, env: dict[str, str]) -> Target:
    base_url = stack.enter_context(jarvis_server(**llama_settings(data_dir, threads), **env)).removesuffix("/v1")
    return Target(name, child_serving(int(base_url.rsplit(":", 1)[1])), lambda e: base_url + e, request_body,
                  ENDPOINTS)


def floor_app() -> Any:
    """Litestar streaming a prebuilt completion chunk per token, each handed over by a worker thread at the
    asked pace (`uvicorn --factory stream_overhead:floor_app`)."""
    event = "data: " + json.dumps({"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
                                   "choices": [{"index": 0, "text": " word", "finish_reason": None,
                                                "logprobs": None}], "usage": None}, separators=(",", ":")) + "\n\n"

    @post("/floor", status_code=200)
    async def floor(data: dict[str, Any]) -> Stream:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def produce() -> None:
            for _ in range(data["max_tokens"]):
                time.sleep(data["pace_s"])
                loop.call_soon_threadsafe(queue.put_nowait, event)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        async def events() -> AsyncIterator[str]:
            threading.Thread(target=produce, daemon=True).start()
            while (item := await queue.get()) is not None:
                yield item
            yield "data: [DONE]\n\n"

        return Stream(events(), media_type="text/event-stream")

    return Litestar([floor])


@contextmanager
def floor_server(pace_s: Callable[[], float]) -> Iterator[Target]:
    """`floor_app` under uvicorn in a subprocess; its events come `pace_s()` seconds apart."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "stream_overhead:floor_app",
                                    "--app-dir", str(Path(__file__).parent), "--port", str(port),
                                    "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/", timeout=2)  # any answer: it is up
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the floor server did not start:\n{log.read()[-3000:]}")
            yield Target("floor", child_serving(port), lambda _: f"http://127.0.0.1:{port}/floor",
                         lambda _, n: {"max_tokens": n, "pace_s": pace_s()}, ("floor",))
        finally:
            process.terminate()
            process.wait(timeout=30)


def stream_once(client: httpx.Client, url: str, body: dict[str, Any]) -> int:
    """One streamed POST read to its end; the SSE events received."""
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        return sum(1 for line in response.iter_lines() if line.startswith("data: "))


def measure_servers(targets: list[Target], short: int, long: int, requests: int) -> dict[str, dict[str, dict]]:
    """Per target and endpoint: CPU µs per chunk of the event-loop thread and of the other threads, wall
    time per chunk. `requests` rounds, in each of which every target streams one short and one long request
    per endpoint, so load that comes and goes falls on all alike."""
    totals = {(t.name, e): {n: [0.0, 0.0, 0.0, 0] for n in (short, long)} for t in targets for e in t.endpoints}
    with httpx.Client(timeout=600) as client:
        for _ in range(requests):
            for target in targets:
                for endpoint in target.endpoints:
                    for n in (short, long):
                        before, started = thread_cpu_ns(target.pid), time.perf_counter()
                        events = stream_once(client, target.url(endpoint), target.body(endpoint, n))
                        wall, after = time.perf_counter() - started, thread_cpu_ns(target.pid)
                        loop = after[target.pid] - before[target.pid]
                        others = sum(ns - before.get(tid, 0) for tid, ns in after.items() if tid != target.pid)
                        for i, value in enumerate((loop / 1e9, others / 1e9, wall, events)):
                            totals[target.name, endpoint][n][i] += value
    results: dict[str, dict[str, dict]] = {}
    for (name, endpoint), runs in totals.items():
        s, lg = runs[short], runs[long]
        loop_us, loop_request_us = per_chunk((s[0], s[3]), (lg[0], lg[3]))
        results.setdefault(name, {})[endpoint] = {
            "loop_chunk_us": round(loop_us, 1), "loop_request_us": round(loop_request_us / requests),
            "engine_chunk_us": round(per_chunk((s[1], s[3]), (lg[1], lg[3]))[0], 1),
            "wall_chunk_us": round(per_chunk((s[2], s[3]), (lg[2], lg[3]))[0], 1),
            "chunks": {short: s[3], long: lg[3]}}
    return results


# --- report ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout to compare with this one (e.g. a git worktree)")
    parser.add_argument("--repeats", type=int, default=50, help="requests per length in each path round (50)")
    parser.add_argument("--rounds", type=int, default=None, help="path rounds per side (1; 3 with --before)")
    parser.add_argument("--path-long", type=int, default=256, help="tokens of a long path request (256)")
    parser.add_argument("--requests", type=int, default=5, help="rounds of server requests (default 5)")
    parser.add_argument("--short", type=int, default=8, help="tokens of a short request (default 8)")
    parser.add_argument("--long", type=int, default=128, help="tokens of a long server request (default 128)")
    parser.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // 2, 1))
    parser.add_argument("--skip-server", action="store_true", help="only the path (a minute, not several)")
    parser.add_argument("--profile", action="store_true", help="cProfile's top functions of the path")
    parser.add_argument("--path-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from jarvis.settings import load_settings

    data_dir = load_settings().data_dir
    if args.path_worker:  # one path measurement, for the parent's subprocess: JSON on the last line
        print(json.dumps(measure_path(data_dir, args.threads, args.short, args.path_long, args.repeats, args.profile)))
        return

    console = Console(width=max(Console().width, 120))
    args.rounds = args.rounds or (3 if args.before else 1)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "path_worker")} | {
        "cpu_count": os.cpu_count(), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as workdir:
        envs = {"this": {}} if args.before is None else {
            "before": checkout_env(args.before.resolve(), Path(workdir) / "before"), "this": {}}
        path: dict[str, dict] = {}
        profiles: dict[str, list] = {}
        with console.status(f"the path in process, {args.rounds} round(s) per side ..."):
            for i in range(args.rounds):
                for side, env in envs.items():
                    measured = path_in_subprocess(env, args, profile=args.profile and side == "this" and i == 0)
                    for endpoint, m in measured.items():
                        kept = path.setdefault(side, {}).setdefault(endpoint, m)
                        kept["least_s"] = {n: min(kept["least_s"][n], s) for n, s in m["least_s"].items()}
                        profiles.update({endpoint: m["profile"]} if "profile" in m else {})
        for endpoints in path.values():
            for m in endpoints.values():
                (s, ls), (lg, ll) = ((m["least_s"][n], m["chunks"][n]) for n in (str(args.short), str(args.path_long)))
                m["chunk_us"], m["request_us"] = (round(v, 1) for v in per_chunk((s, ls), (lg, ll)))
        servers: dict[str, dict[str, dict]] = {}
        if not args.skip_server:
            with console.status(f"`jarvis serve` ({', '.join(envs)}) and the floor: {args.requests} rounds of "
                                f"{args.short} and {args.long} tokens per endpoint ..."), ExitStack() as stack:
                targets = [jarvis_target(stack, side, data_dir, args.threads, env) for side, env in envs.items()]
                pace = {}
                with httpx.Client(timeout=600) as client:  # warm-up, and the engine's pace for the floor
                    for target in targets:
                        for endpoint in ENDPOINTS:
                            started = time.perf_counter()
                            chunks = stream_once(client, target.url(endpoint), request_body(endpoint, 32))
                            pace[target.name] = (time.perf_counter() - started) / chunks
                targets.append(stack.enter_context(floor_server(lambda: min(pace.values()))))
                servers = measure_servers(targets, args.short, args.long, args.requests)
    config["load_after"] = os.getloadavg()[0]
    print_report(console, args, config, path, servers, profiles)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "stream_overhead.json"
    out.write_text(json.dumps({"config": config, "path": path, "servers": servers, "profiles": profiles}, indent=2,
                              default=str))
    console.print(f"results: {out}")


def print_report(console: Console, args: argparse.Namespace, config: dict, path: dict, servers: dict,
                 profiles: dict) -> None:
    table = Table(title="Jarvis's host cost per streamed chunk, µs of CPU (default plugins, llama.cpp gemma-3-270m)")
    for column in ["code", "endpoint", "path µs/chunk", "path µs/request", "server loop µs/chunk",
                   "server - floor", "engine µs/chunk", "ms/chunk"]:
        table.add_column(column, justify="left" if column in ("code", "endpoint") else "right")
    floor = servers.get("floor", {}).get("floor")
    for side, endpoints in path.items():
        for endpoint, p in endpoints.items():
            s = servers.get(side, {}).get(endpoint)
            table.add_row(side, endpoint.removeprefix("/v1/"), f"{p['chunk_us']:.1f}", f"{p['request_us']:.0f}",
                          *(["—"] * 4 if s is None else
                            [f"{s['loop_chunk_us']:.0f}", f"{s['loop_chunk_us'] - floor['loop_chunk_us']:+.0f}",
                             f"{s['engine_chunk_us']:.0f}", f"{s['wall_chunk_us'] / 1000:.1f}"]))
    if floor is not None:
        table.add_row("floor", "bare Litestar + uvicorn", "—", "—", f"{floor['loop_chunk_us']:.0f}", "—", "—",
                      f"{floor['wall_chunk_us'] / 1000:.1f}")
    console.print(table)
    console.print(f"path: engine replayed, no socket; least CPU time of {args.repeats} × {args.rounds} "
                  f"requests of {args.short} and of {args.path_long} tokens. server: {args.requests} rounds of "
                  f"{args.short} and {args.long} tokens; loop = the event-loop thread, engine = the other threads. "
                  f"Load average before/after: {config['load_before']:.2f} / {config['load_after']:.2f} on "
                  f"{os.cpu_count()} cores.")
    for endpoint, rows in profiles.items():
        top = Table(title=f"cProfile of the path, {endpoint}: own time per chunk (inflated by the profiler)")
        for column in ["function", "µs/chunk", "calls/100 chunks"]:
            top.add_column(column, justify="left" if column == "function" else "right")
        for name, own_us, calls in rows:
            top.add_row(name, f"{own_us:.2f}", str(calls))
        console.print(top)


if __name__ == "__main__":
    main()
