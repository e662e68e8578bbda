"""What does a proxy in front of an OpenAI-compatible server cost, and what does it do past its ceiling?

Three targets, measured in one run against the same fast upstream (`bench/upstream_stub.py`: fixed answers,
thousands of requests per second on one core), one server process each:

  direct   the stub itself: the physical floor
  jarvis   `python -m jarvis serve` with the `openai` engine in front of the stub (default settings, its default
           log level; telemetry off unless --telemetry)
  litellm  LiteLLM's proxy (one worker, no database, callbacks off) in a virtualenv of its own, made on first use
           under --venvs (skipped with --no-litellm, or when it cannot be installed)
  before   with --before DIR: Jarvis from another checkout (e.g. `git worktree add /tmp/before HEAD~1`), same
           settings: a change's effect measured side by side with it

The load comes from a separate process (raw HTTP/1.1 on keep-alive connections; latency counted from each
request's scheduled time, so a client that falls behind shows as latency, not as a lower rate):

  latency    an open loop at each of --rates req/s for --duration s, non-streamed and streamed: p50/p99 latency; the
             target's CPU seconds per request (its process's utime+stime); "added" = target p50 - direct p50
  ceiling    a closed loop of --concurrency clients: the requests/s the target sustains
  overload   an open loop at 2x the ceiling: the rate of 200s delivered (goal: >= 95% of the ceiling), how the
             excess is answered (429 and its p99 latency; goal <= 10 ms) and the 200s' p99

Rounds alternate the order of the targets. The table prints medians over rounds; --out writes every figure.

    python bench/proxy_load.py [--rounds R] [--duration S] [--rates N,M] [--concurrency C] [--no-litellm]
                               [--telemetry] [--venvs DIR] [--before DIR] [--out DIR]
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
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import checkout_env, jarvis_server_process  # noqa: E402

HERE = Path(__file__).parent
#: The key every request sends: LiteLLM's master key (it refuses to start without a strong one); the others ignore it.
KEY = "sk-bench-4f7c2a9e1b6d8035c2e7a914f0b3d6e8"
BODY = {"model": "stub", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its children that are still alive (a LiteLLM worker is a child)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


# --- the load generator (its own process) ---------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


class Connections:
    """Keep-alive connections to one port, up to `limit` at once (beyond, a request waits for one)."""

    def __init__(self, port: int, request: bytes, limit: int = 512) -> None:
        self.port, self.request = port, request
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(limit)

    async def send(self) -> int:
        async with self.slots:
            conn = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
            try:
                conn[1].write(self.request)
                status = await _read_response(conn[0])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                conn[1].close()
                return 0
            self.idle.append(conn)
            return status


def request_bytes(path: str, stream: bool) -> bytes:
    body = json.dumps({**BODY, "stream": stream}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def open_loop(port: int, path: str, stream: bool, rate: float,
                    duration: float) -> list[tuple[int, float, float]]:
    """(status, latency from the scheduled time, completion time from the start) of each request."""
    pool = Connections(port, request_bytes(path, stream))
    results: list[tuple[int, float, float]] = []
    start = time.perf_counter()

    async def one(at: float) -> None:
        status = await pool.send()
        now = time.perf_counter()
        results.append((status, now - at, now - start))

    tasks = []
    for i in range(int(rate * duration)):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    await asyncio.wait(tasks, timeout=60)
    return results


async def closed_loop(port: int, path: str, concurrency: int, duration: float) -> list[tuple[int, float, float]]:
    pool = Connections(port, request_bytes(path, False))
    results: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    end = start + duration

    async def client() -> None:
        while time.perf_counter() < end:
            at = time.perf_counter()
            status = await pool.send()
            now = time.perf_counter()
            results.append((status, now - at, now - start))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def generate(args: list[str]) -> None:
    """`--generate MODE PORT PATH ...`: run one load and print its (status, seconds) pairs as JSON."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, port, path = args[0], int(args[1]), args[2]
    if mode == "open":
        out = asyncio.run(open_loop(port, path, args[3] == "stream", float(args[4]), float(args[5])))
    else:
        out = asyncio.run(closed_loop(port, path, int(args[3]), float(args[4])))
    print(json.dumps(out))


def load(*args: Any) -> list[tuple[int, float, float]]:
    done = subprocess.run([sys.executable, __file__, "--generate", *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=True)
    return [tuple(r) for r in json.loads(done.stdout)]  # type: ignore[misc]


# --- the targets ------------------------------------------------------------------------------------------


@contextmanager
def stub_server():
    port = free_port()
    process = subprocess.Popen([sys.executable, str(HERE / "upstream_stub.py"), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield port, process
    finally:
        process.terminate()
        process.wait()


@contextmanager
def litellm_server(upstream: int, venvs: Path):
    venv = venvs / "litellm"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "litellm[proxy]"], check=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(f"""model_list:
  - model_name: stub
    litellm_params: {{model: openai/stub, api_base: "http://127.0.0.1:{upstream}/v1", api_key: sk-stub}}
litellm_settings: {{callbacks: [], success_callback: [], failure_callback: [], telemetry: false, drop_params: true}}
general_settings: {{disable_spend_logs: true}}
""")
        env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": KEY}
        log = open(Path(tmp) / "litellm.log", "w+")
        process = subprocess.Popen([str(venv / "bin" / "litellm"), "--config", str(config), "--port", str(port),
                                    "--num_workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout_s=300, process=process)
            except RuntimeError:
                log.seek(0)
                raise RuntimeError(f"LiteLLM did not start:\n{log.read()[-3000:]}") from None
            yield port, process
        finally:
            process.terminate()
            process.wait(timeout=60)


def measure(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    path = "/v1/chat/completions"
    out: dict[str, Any] = {"rates": {}}
    load("closed", port, path, 4, 2)  # warm up
    for rate in rates_of(args):
        at_rate = out["rates"][f"{rate:g}"] = {}
        for stream in (False, True):
            before = cpu_seconds(pid)
            runs = load("open", port, path, "stream" if stream else "whole", rate, args.duration)
            ok = [s for status, s, _ in runs if status == 200]
            at_rate["stream" if stream else "whole"] = {
                "p50_ms": 1000 * statistics.median(ok) if ok else None,
                "p99_ms": 1000 * statistics.quantiles(ok, n=100)[98] if len(ok) > 1 else None,
                "cpu_ms": 1000 * (cpu_seconds(pid) - before) / max(1, len(ok)), "failed": len(runs) - len(ok)}
    runs = load("closed", port, path, args.concurrency, args.duration)
    ceiling = sum(1 for status, _, _ in runs if status == 200) / args.duration
    out["ceiling_rps"] = ceiling
    if ceiling > args.max_offered / 2:  # the load generator could not offer twice as much
        return out
    runs = load("open", port, path, "whole", 2 * ceiling, args.duration)
    ok = [s for status, s, done in runs if status == 200 and done <= args.duration]  # delivered in the window
    shed = [s for status, s, _ in runs if status == 429]
    delivered = len(ok) / args.duration
    out["overload"] = {"offered_rps": 2 * ceiling, "delivered_rps": delivered,
                       "delivered_vs_ceiling": delivered / ceiling if ceiling else None,
                       "ok_p99_ms": 1000 * statistics.quantiles(ok, n=100)[98] if len(ok) > 1 else None,
                       "shed": len(shed), "shed_p99_ms": 1000 * statistics.quantiles(shed, n=100)[98]
                       if len(shed) > 1 else None,
                       "other": sum(1 for status, _, _ in runs if status not in (200, 429))}
    return out


def rates_of(args: argparse.Namespace) -> list[float]:
    return [float(rate) for rate in args.rates.split(",") if rate]


def main() -> None:
    if sys.argv[1:2] == ["--generate"]:
        generate(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--rates", default="50,400",
                        help="open-loop rates (req/s) of the latency step, comma-separated: at a low rate every "
                             "request finds the server's code and data out of the CPU caches, so it costs more")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-offered", type=float, default=12000,
                        help="the most req/s the overload step offers (the generator's open loop keeps up with "
                             "10,000 req/s against the stub on 2 cores, p50 0.3 ms)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--telemetry", action="store_true")
    parser.add_argument("--jarvis-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the Jarvis server (repeatable), e.g. JARVIS_MAX_CONCURRENT=64")
    parser.add_argument("--venvs", type=Path, default=Path.home() / ".cache" / "jarvis" / "bench-venvs")
    parser.add_argument("--before", type=Path, help="another checkout's Jarvis, measured too (same settings)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=220)
    results: dict[str, list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        upstream, stub = stack.enter_context(stub_server())
        targets: dict[str, tuple[int, int]] = {"direct": (upstream, stub.pid)}
        settings = {"JARVIS_INFERENCE_ENGINE": "openai", "JARVIS_UPSTREAM_URL": f"http://127.0.0.1:{upstream}/v1",
                    "JARVIS_LOG_LEVEL": "info", "JARVIS_TELEMETRY_ENABLED": str(args.telemetry).lower(),
                    **dict(item.split("=", 1) for item in args.jarvis_env)}
        v1, jarvis = stack.enter_context(jarvis_server_process(**settings))
        targets["jarvis"] = (int(v1.rsplit(":", 1)[1].split("/")[0]), jarvis.pid)
        if args.before:
            links = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            v1, before = stack.enter_context(jarvis_server_process(**settings,
                                                                   **checkout_env(args.before.resolve(), links)))
            targets["before"] = (int(v1.rsplit(":", 1)[1].split("/")[0]), before.pid)
        if not args.no_litellm:
            try:
                port, process = stack.enter_context(litellm_server(upstream, args.venvs))
                targets["litellm"] = (port, process.pid)
            except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
                console.print(f"[yellow]LiteLLM skipped: {exc}")
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(targets)[::-1]
            for name in order:
                console.print(f"round {r + 1}: {name}")
                results.setdefault(name, []).append(measure(*targets[name], args))

    def med(name: str, *keys: str) -> float | None:
        values = []
        for run in results[name]:
            value: Any = run
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                values.append(value)
        return statistics.median(values) if values else None

    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    table = Table(title=f"proxy load, medians of {args.rounds} rounds (open loop at {args.rates} req/s for latency, "
                        f"c={args.concurrency} for the ceiling, 2x the ceiling for overload)")
    for column in ("target", "req/s", "p50 ms", "added p50", "p99 ms", "CPU ms/req", "stream p50", "stream added",
                   "stream CPU", "ceiling req/s", "overload: delivered", "vs ceiling", "429s", "429 p99 ms",
                   "200 p99 ms"):
        table.add_column(column)
    for name in results:
        for i, rate in enumerate(f"{rate:g}" for rate in rates_of(args)):
            base, base_stream = med("direct", "rates", rate, "whole", "p50_ms"), med("direct", "rates", rate, "stream",
                                                                                      "p50_ms")
            p50, s50 = med(name, "rates", rate, "whole", "p50_ms"), med(name, "rates", rate, "stream", "p50_ms")
            once = i == 0  # the ceiling and overload columns: on a target's first row
            table.add_row(name if once else "", rate, fmt(p50),
                          fmt(p50 - base if p50 is not None and base is not None else None),
                          fmt(med(name, "rates", rate, "whole", "p99_ms")),
                          fmt(med(name, "rates", rate, "whole", "cpu_ms")), fmt(s50),
                          fmt(s50 - base_stream if s50 is not None and base_stream is not None else None),
                          fmt(med(name, "rates", rate, "stream", "cpu_ms")),
                          *(fmt(v, spec) if once else "" for v, spec in (
                              (med(name, "ceiling_rps"), ".0f"), (med(name, "overload", "delivered_rps"), ".0f"),
                              (med(name, "overload", "delivered_vs_ceiling"), ".2f"),
                              (med(name, "overload", "shed"), ".0f"), (med(name, "overload", "shed_p99_ms"), ".1f"),
                              (med(name, "overload", "ok_p99_ms"), ".0f"))))
    console.print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "proxy_load.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
