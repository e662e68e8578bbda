"""What the telemetry plugin does per generation and in the background.

`TelemetryRecorder.started/finished` run in the request hooks: they open and
close the generation span, record the metrics, feed the alert window and log
failures with their request id, model, adapter and trace id. `monitor()` is
the background task: the periodic status line (requests/s, tokens/s,
in-flight, memory) and the alert checks. Nothing here sees HTTP headers, so
no API key can reach a span, a metric or a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jarvis.plugins.telemetry.alerts import AlertEvaluator, FinishedGeneration, RequestWindow, ServerSnapshot
from jarvis.plugins.telemetry.metrics import ServerMetrics, operation_of
from jarvis.plugins.telemetry.resources import ResourceSampler
from jarvis.plugins.telemetry.settings import TelemetrySettings

if TYPE_CHECKING:
    from jarvis.runtime import Runtime

log = logging.getLogger("jarvis.telemetry")


@dataclass
class _OpenGeneration:
    started: float  # time.monotonic()
    started_unix_ns: int
    span: Any


def generation_status(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"  # the client went away; not the server's failure
    return "error"


class TelemetryRecorder:
    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.sampler = ResourceSampler(gpu=settings.gpu)
        self.metrics = ServerMetrics(self.sampler)
        self.window = RequestWindow(settings.alert_window_s)
        self.alerts = AlertEvaluator(settings, self.window, self._set_alert)
        self.tracing: Any = None
        self.pusher: Any = None
        if settings.otlp:
            from jarvis.plugins.telemetry.otlp_metrics import OtlpMetricsPusher
            from jarvis.plugins.telemetry.tracing import Tracing

            self.tracing = Tracing(settings.service_name, settings.span_export_delay_ms)
            self.pusher = OtlpMetricsPusher(self.metrics.registry, settings.service_name,
                                            settings.metrics_export_interval_s)
        self.runtime: Runtime = None
        self._open: dict[str, _OpenGeneration] = {}
        self._monitor: asyncio.Task | None = None
        self.finished_count = 0
        self.output_tokens = 0

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, runtime: Runtime) -> None:
        """Bind the runtime (in-flight and queue figures) and start the background work."""
        self.runtime = runtime
        self.metrics.bind(runtime)
        if self.pusher is not None:
            self.pusher.start()
        self._monitor = asyncio.get_running_loop().create_task(self.monitor(), name="jarvis-telemetry")

    def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        if self.pusher is not None:
            self.pusher.stop()
        if self.tracing is not None:
            self.tracing.shutdown()
        self.sampler.close()

    # --- the request hooks ------------------------------------------------------------------------

    def started(self, request: Any) -> None:
        span = self.tracing.start_generation(request) if self.tracing is not None else None
        self._open[request.request_id] = _OpenGeneration(time.monotonic(), time.time_ns(), span)

    def finished(self, request: Any, result: Any, error: BaseException | None) -> None:
        opened = self._open.pop(request.request_id, None)
        if opened is None:
            return
        now = time.monotonic()
        latency = now - opened.started
        ttft = request.first_token_at - opened.started if request.first_token_at is not None else None
        status = generation_status(error)
        prompt_tokens = result.prompt_tokens if result is not None else 0
        completion_tokens = result.completion_tokens if result is not None else 0
        operation = operation_of(request.kind)
        self.metrics.record(request.model, request.adapter, operation, status, latency_s=latency, ttft_s=ttft,
                            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            error_type=type(error).__name__ if status == "error" else None,
                            tool_names=[c.name or "" for c in result.tool_calls] if result is not None else (),
                            api=request.context.api)
        self.finished_count += 1
        self.output_tokens += completion_tokens
        if status != "cancelled":
            self.window.add(FinishedGeneration(now, latency, ttft, status == "error", request.request_id,
                                               request.model, request.adapter))
        if opened.span is not None:
            first_ns = opened.started_unix_ns + int(ttft * 1e9) if ttft is not None else None
            self.tracing.finish_generation(opened.span, request, result, error, first_ns, ttft, status)
        if status == "error":
            log.error("generation failed: %s: %s (request_id=%s model=%s adapter=%s engine=%s trace_id=%s)",
                      type(error).__name__, error, request.request_id, request.model, request.adapter or "none",
                      request.engine, self._trace_id(opened.span) or "none")

    def audit(self, event: dict[str, Any]) -> None:
        """An audit event (`jarvis.auth.audit`): counted, and added to the request's span when tracing."""
        self.metrics.audit_events.labels(event["outcome"], "admin_scope" if "scope" in event else "ownership").inc()
        if self.tracing is not None:
            from opentelemetry import trace

            trace.get_current_span().add_event("jarvis.audit", attributes={k: str(v) for k, v in event.items()})

    def _trace_id(self, span: Any) -> str | None:
        if self.tracing is None:
            return None
        from jarvis.plugins.telemetry.tracing import current_trace_id

        return current_trace_id(span)

    def _set_alert(self, name: str, active: bool) -> None:
        self.metrics.alert_active.labels(alert=name).set(1 if active else 0)

    # --- the background loop ----------------------------------------------------------------------

    def snapshot(self) -> ServerSnapshot:
        memory = self.sampler.memory()
        runtime = self.runtime
        return ServerSnapshot(runtime.in_flight if runtime else 0, runtime.queue_depth if runtime else 0,
                              memory.percent, memory.resident_bytes)

    async def monitor(self) -> None:
        """Status lines every `log_interval_s` (0 = never) and alert checks every `alert_check_interval_s`."""
        s = self.settings
        last = time.monotonic()
        next_log = last + s.log_interval_s if s.log_interval_s > 0 else float("inf")
        next_check = last + s.alert_check_interval_s
        counted = (self.finished_count, self.output_tokens)
        while True:
            await asyncio.sleep(max(0.0, min(next_log, next_check) - time.monotonic()))
            now = time.monotonic()
            try:
                if now >= next_check:
                    next_check = now + s.alert_check_interval_s
                    self.alerts.evaluate(self.snapshot(), now)
                if now >= next_log:
                    next_log = now + s.log_interval_s
                    totals = (self.finished_count, self.output_tokens)
                    log.info(self.status_line(now - last, totals[0] - counted[0], totals[1] - counted[1]))
                    last, counted = now, totals
            except Exception:  # the loop must outlive one bad sample
                log.exception("telemetry monitor step failed")

    def status_line(self, elapsed_s: float, requests: int, tokens: int) -> str:
        snap = self.snapshot()
        elapsed_s = max(elapsed_s, 1e-9)
        parts = [f"{requests / elapsed_s:.2f} req/s", f"{tokens / elapsed_s:.1f} tok/s",
                 f"in-flight {snap.in_flight}", f"queue {snap.queue_depth}",
                 f"rss {snap.memory_bytes / 2**20:.0f} MiB ({snap.memory_percent:.1f}%)"]
        parts += [f"gpu{g.index} {g.utilization_percent:.0f}% {g.memory_used_bytes / 2**30:.1f}/"
                  f"{g.memory_total_bytes / 2**30:.1f} GiB" for g in self.sampler.gpus()]
        if self.alerts.active:
            parts.append("alerts " + ",".join(sorted(self.alerts.active)))
        return "telemetry: " + ", ".join(parts)
