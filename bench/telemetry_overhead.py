"""What does telemetry cost? Jarvis with the telemetry plugin fully on vs off, same prompts, one run.

Two servers run side by side with identical engine settings (embedded gemma-3-270m, greedy, same
max_tokens, n_threads, JARVIS_LLAMA_N_PARALLEL=1):

  off  JARVIS_TELEMETRY_ENABLED=false: no metrics, no spans, no status line, no alerts;
  on   everything on: Prometheus metrics (scraped once a second during the run, as a busy Prometheus
       would), the status line, alert checks, and OTLP export of traces (server + generation span per
       request) and metrics to a local OTLP/HTTP sink in this process that accepts and counts them.

Requests are sequential /v1/completions through the official `openai` client (non-streaming, or
streaming with --stream, which also reports time to first token). For each prompt the two servers run
back to back, in an order that alternates from prompt to prompt, so background load hits both alike.

How to read it: "added ms" = on latency - off latency for the same prompt (paired), p50 / p95;
"tok/s on/off" = completion tokens per second with telemetry / without (1.000 = no cost; the goal is
at least 0.97); "texts match" counts prompts whose greedy completion is the same on both. On a shared or busy machine
the paired numbers are noisy; the last line adds a deterministic figure: the request-path cost of the
telemetry hooks per generation measured in-process (µs), and its share of the median request.

    python bench/telemetry_overhead.py [--requests N] [--max-tokens M] [--threads T] [--stream]
                                       [--hook-iterations K] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from openai import OpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402
from proxy_overhead import Sample, jarvis_client, llama_settings, make_prompts, summarize  # noqa: E402


class OtlpSink:
    """Accepts OTLP/HTTP posts on 127.0.0.1 and counts them (the bench needs a live endpoint, not the data)."""

    def __init__(self) -> None:
        self.posts: dict[str, int] = {}
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                size = int(self.headers.get("Content-Length", 0))
                self.rfile.read(size)
                sink.posts[self.path] = sink.posts.get(self.path, 0) + 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Scraper:
    """GET /metrics every `interval_s` in a thread, like Prometheus with a short scrape interval."""

    def __init__(self, base_url: str, interval_s: float = 1.0) -> None:
        self.url = f"{base_url}/metrics"
        self.interval_s = interval_s
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(self.interval_s):
                if client.get(self.url).status_code == 200:
                    self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def hook_cost_us(iterations: int) -> dict[str, float]:
    """In-process cost of the telemetry request hooks per generation (µs), without and with span recording.

    The same `TelemetryRecorder` code the server runs, on real `PreparedRequest`s; spans go to the SDK's
    in-memory exporter through the batch processor, so this is the request path's cost, not the export's.
    """
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from jarvis.engine import GenerationResult, PreparedRequest, RequestContext
    from jarvis.plugins.telemetry.recorder import TelemetryRecorder
    from jarvis.plugins.telemetry.settings import TelemetrySettings
    from jarvis.plugins.telemetry.tracing import Tracing

    result = GenerationResult("text", "length", 20, 32)
    costs = {}
    for name in ("metrics", "metrics+spans"):
        recorder = TelemetryRecorder(TelemetrySettings(_env_file=None, gpu=False))
        if name == "metrics+spans":
            recorder.tracing = Tracing("bench", 1000, exporter=InMemorySpanExporter())
        requests = [PreparedRequest(prompt="p", model="m", context=RequestContext(engine="llama_cpp"))
                    for _ in range(iterations)]
        start = time.perf_counter()
        for request in requests:
            recorder.started(request)
            request.context.first_token_at = time.monotonic()
            recorder.finished(request, result, None)
        costs[name] = round((time.perf_counter() - start) / iterations * 1e6, 1)
        if recorder.tracing is not None:
            recorder.tracing.shutdown()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="distinct prompts (default 20)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // 2, 1))
    parser.add_argument("--stream", action="store_true", help="streaming requests (adds TTFT)")
    parser.add_argument("--hook-iterations", type=int, default=5000,
                        help="generations for the in-process hook cost measurement (default 5000)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from jarvis.settings import load_settings

    console = Console(width=max(Console().width, 120))
    data_dir = load_settings().data_dir
    prompts = make_prompts(args.requests)
    sink = OtlpSink()
    on_env = {"JARVIS_TELEMETRY_ENABLED": "true", "JARVIS_TELEMETRY_OTLP": "true",
              "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
              "JARVIS_TELEMETRY_SPAN_EXPORT_DELAY_MS": "1000", "JARVIS_TELEMETRY_METRICS_EXPORT_INTERVAL_S": "5",
              "JARVIS_TELEMETRY_LOG_INTERVAL_S": "5", "JARVIS_TELEMETRY_ALERT_CHECK_INTERVAL_S": "1"}
    config = {"requests": args.requests, "max_tokens": args.max_tokens, "threads": args.threads,
              "stream": args.stream, "cpu_count": os.cpu_count(), "load_before": os.getloadavg()[0], "on_env": on_env}

    try:
        with console.status(f"{len(prompts)} prompts through Jarvis with telemetry off and on ..."):
            with jarvis_server(**llama_settings(data_dir, args.threads, JARVIS_TELEMETRY_ENABLED="false")) as off_url, \
                    jarvis_server(**llama_settings(data_dir, args.threads, **on_env)) as on_url:
                scraper = Scraper(on_url.removesuffix("/v1"))
                clients = {name: OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
                           for name, url in (("off", off_url), ("on", on_url))}
                model = clients["off"].models.list().data[0].id
                paths = {name: jarvis_client(c, model, args.max_tokens, args.stream) for name, c in clients.items()}
                for complete in paths.values():
                    complete("Warm-up: the quick brown fox")
                runs: dict[str, list[Sample]] = {"off": [], "on": []}
                for i, prompt in enumerate(prompts):
                    for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                        runs[name].append(paths[name](prompt))
                scraper.stop()
                time.sleep(1.5)  # one more span export
    finally:
        sink.close()
    config.update(load_after=os.getloadavg()[0], scrapes=scraper.scrapes, otlp_posts=sink.posts, otlp_bytes=sink.bytes)

    summary = {name: summarize(samples, runs["off"], "off") for name, samples in runs.items()}
    table = Table(title=f"Telemetry on vs off — {args.requests} sequential {'streaming ' if args.stream else ''}"
                        f"requests, max_tokens={args.max_tokens}, n_threads={args.threads}, greedy")
    for column in ["telemetry", "p50 ms", "p95 ms", "TTFT p50 ms", "tok/s", "added p50 ms", "added p95 ms",
                   "tok/s on/off", "texts match"]:
        table.add_column(column, justify="left" if column == "telemetry" else "right")
    for name, s in summary.items():
        off = name == "off"
        table.add_row(name, f"{s['latency_p50_ms']:.1f}", f"{s['latency_p95_ms']:.1f}",
                      "—" if s["ttft_p50_ms"] is None else f"{s['ttft_p50_ms']:.1f}", f"{s['tokens_per_s']:.1f}",
                      "—" if off else f"{s['added_p50_ms']:+.1f}", "—" if off else f"{s['added_p95_ms']:+.1f}",
                      "—" if off else f"{s['tokens_per_s_vs_off']:.3f}",
                      "—" if off else f"{s['texts_match']}/{args.requests}")
    console.print(table)
    console.print(f"'on' exported {sum(sink.posts.values())} OTLP posts ({sink.bytes} bytes: {sink.posts}) and was "
                  f"scraped {scraper.scrapes} times. Load average before/after: {config['load_before']:.2f} / "
                  f"{config['load_after']:.2f} on {config['cpu_count']} cores.")
    hooks = hook_cost_us(args.hook_iterations)
    median_ms = summary["off"]["latency_p50_ms"]
    config["hook_cost_us"] = hooks
    console.print(f"Request-path cost of the hooks per generation: {hooks['metrics']} µs with metrics, "
                  f"{hooks['metrics+spans']} µs with metrics and spans = "
                  f"{hooks['metrics+spans'] / 1000 / median_ms:.5%} of the median request ({median_ms:.0f} ms).")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "telemetry_overhead.json"
    out.write_text(json.dumps({"config": config, "summary": summary,
                               "requests": [{"prompt": p, **{n: asdict(runs[n][i]) for n in runs}}
                                            for i, p in enumerate(prompts)]}, indent=2))
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
