"""The Prometheus metrics of a Jarvis server, in one registry that /metrics and OTLP both read.

Per-request figures (counters, histograms) are recorded when a generation
finishes; gauges that describe the server now (in-flight, queue depth,
memory, GPUs) are read at collection time from the runtime and the resource
sampler, so they cost nothing between scrapes. Labels are the model, the
adapter ("none" for the base model) and, on the request counter, the status
(ok, error, cancelled) — never anything from the request's content or headers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from jarvis.plugins.telemetry.resources import ResourceSampler

if TYPE_CHECKING:
    from jarvis.runtime import Runtime

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
ALERTS = ("p95_latency", "error_rate", "p95_ttft", "memory", "queue_depth")
#: Gauges read at collection time; the GPU ones appear only where NVML sees a GPU.
LIVE_METRICS = ("jarvis_requests_in_flight", "jarvis_queue_depth", "jarvis_process_resident_memory_bytes",
                "jarvis_machine_memory_bytes", "jarvis_gpu_utilization_percent", "jarvis_gpu_memory_used_bytes",
                "jarvis_gpu_memory_total_bytes")


def adapter_label(adapter: str | None) -> str:
    return adapter or "none"


def operation_of(kind: str) -> str:
    """A request's kind as the GenAI conventions name the operation (the `operation` label, the span name)."""
    return {"chat": "chat", "embedding": "embeddings"}.get(kind, "text_completion")


class ServerMetrics:
    """Every metric Jarvis exports; `registry` is what GET /metrics renders."""

    def __init__(self, sampler: ResourceSampler | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` series: half the size, nothing a dashboard reads
        self.registry = CollectorRegistry(auto_describe=True)
        by_model = ["model", "adapter"]
        r = self.registry
        self.requests = Counter("jarvis_requests", "Generations finished, by model, adapter, operation, status and "
                                "the wire API that asked (openai, anthropic, tinker).",
                                [*by_model, "operation", "status", "api"], registry=r)
        self.errors = Counter("jarvis_request_errors", "Generations that failed, by error type.",
                              [*by_model, "error_type"], registry=r)
        self.latency = Histogram("jarvis_request_duration_seconds", "Generation latency, start to last token.",
                                 by_model, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("jarvis_time_to_first_token_seconds", "Time from start to the first generated token.",
                              by_model, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jarvis_time_per_output_token_seconds",
                              "Decode time per output token after the first.", by_model, buckets=TPOT_BUCKETS,
                              registry=r)
        self.tokens_per_second = Histogram("jarvis_request_output_tokens_per_second",
                                           "Output tokens per second of each generation.", by_model,
                                           buckets=TOKENS_PER_SECOND_BUCKETS, registry=r)
        self.prompt_tokens = Counter("jarvis_prompt_tokens", "Prompt (input) tokens processed.", by_model, registry=r)
        self.completion_tokens = Counter("jarvis_completion_tokens", "Completion (output) tokens generated.",
                                         by_model, registry=r)
        self.tool_calls = Counter("jarvis_tool_calls", "Tool calls the model made, by function name.",
                                  [*by_model, "tool"], registry=r)
        self.audit_events = Counter("jarvis_audit_events", "Admin actions (allowed) and refused accesses (denied: "
                                    "403; hidden: another key's object answered 404), by outcome and kind "
                                    "(admin_scope or ownership).", ["outcome", "kind"], registry=r)
        self.alert_active = Gauge("jarvis_alert_active", "1 while the alert's threshold is crossed.", ["alert"],
                                  registry=r)
        for name in ALERTS:
            self.alert_active.labels(alert=name).set(0)
        self._runtime: Runtime = None
        self._sampler = sampler
        r.register(_LiveCollector(lambda: self._runtime, sampler))

    def bind(self, runtime: Runtime) -> None:
        """Read in-flight and queue figures from this runtime from now on."""
        self._runtime = runtime

    def record(self, model: str, adapter: str | None, operation: str, status: str, *, latency_s: float,
               ttft_s: float | None, prompt_tokens: int, completion_tokens: int, error_type: str | None,
               tool_names: Sequence[str] = (), api: str = "openai") -> None:
        label = adapter_label(adapter)
        for name in tool_names:
            self.tool_calls.labels(model, label, name).inc()
        self.requests.labels(model, label, operation, status, api).inc()
        if error_type is not None:
            self.errors.labels(model, label, error_type).inc()
        if status != "ok":
            return
        self.latency.labels(model, label).observe(latency_s)
        self.prompt_tokens.labels(model, label).inc(prompt_tokens)
        self.completion_tokens.labels(model, label).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model, label).observe(ttft_s)
            decode_s = latency_s - ttft_s
            if completion_tokens > 1 and decode_s > 0:
                self.tpot.labels(model, label).observe(decode_s / (completion_tokens - 1))
        if completion_tokens and latency_s > 0:
            self.tokens_per_second.labels(model, label).observe(completion_tokens / latency_s)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveCollector:
    """Gauges read at collection time: in-flight, queue depth, process memory, GPUs."""

    def __init__(self, runtime: Callable[[], Any], sampler: ResourceSampler | None) -> None:
        self._runtime = runtime
        self._sampler = sampler

    def describe(self) -> list:
        return []  # families vary with the devices present; collect() tells

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        runtime = self._runtime()
        in_flight = GaugeMetricFamily("jarvis_requests_in_flight", "Generations running or waiting now.")
        queue = GaugeMetricFamily("jarvis_queue_depth", "Generations waiting for an engine slot.")
        in_flight.add_metric([], runtime.in_flight if runtime is not None else 0)
        queue.add_metric([], runtime.queue_depth if runtime is not None else 0)
        yield in_flight
        yield queue
        if self._sampler is None:
            return
        memory = self._sampler.memory()
        rss = GaugeMetricFamily("jarvis_process_resident_memory_bytes", "Resident memory of the server process.")
        rss.add_metric([], memory.resident_bytes)
        total = GaugeMetricFamily("jarvis_machine_memory_bytes", "Physical memory of the machine.")
        total.add_metric([], memory.machine_total_bytes)
        yield rss
        yield total
        gpus = self._sampler.gpus()
        if not gpus:
            return
        util = GaugeMetricFamily("jarvis_gpu_utilization_percent", "GPU busy time, percent.", labels=["gpu", "name"])
        used = GaugeMetricFamily("jarvis_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"])
        cap = GaugeMetricFamily("jarvis_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu", "name"])
        for gpu in gpus:
            labels = [str(gpu.index), gpu.name]
            util.add_metric(labels, gpu.utilization_percent)
            used.add_metric(labels, gpu.memory_used_bytes)
            cap.add_metric(labels, gpu.memory_total_bytes)
        yield util
        yield used
        yield cap
