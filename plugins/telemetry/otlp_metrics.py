"""Pushes the Prometheus registry over OTLP, so /metrics and an OTel collector see the same numbers.

One registry is the source of truth (no second set of instruments to keep in
step and no second cost per request): a background thread collects it every
`interval_s`, converts counters to cumulative monotonic sums, gauges to
gauges and histograms to explicit-bucket histograms, and hands the batch to
the OTLP metric exporter (http/protobuf or grpc, per OTEL_EXPORTER_OTLP_*).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from jarvis.plugins.telemetry.tracing import otel_resource, otlp_protocol

log = logging.getLogger("jarvis.telemetry")


def metric_exporter() -> Any:
    if otlp_protocol("metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


def registry_as_metrics_data(registry: Any, resource: Any, start_ns: int) -> Any:
    """One collection of a prometheus_client registry as OTel `MetricsData` (cumulative)."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    now = time.time_ns()
    cumulative = AggregationTemporality.CUMULATIVE
    metrics = []
    for family in registry.collect():
        if family.type == "counter":
            points = [NumberDataPoint(dict(s.labels), start_ns, now, s.value)
                      for s in family.samples if s.name.endswith("_total")]
            data: Any = Sum(points, cumulative, is_monotonic=True)
            name = f"{family.name}_total"
        elif family.type == "gauge":
            data = Gauge([NumberDataPoint(dict(s.labels), start_ns, now, s.value) for s in family.samples])
            name = family.name
        elif family.type == "histogram":
            data = Histogram(_histogram_points(family.samples, start_ns, now, HistogramDataPoint), cumulative)
            name = family.name
        else:
            continue
        if data.data_points:
            metrics.append(Metric(name, family.documentation, None, data))
    scope = ScopeMetrics(InstrumentationScope("jarvis.plugins.telemetry"), metrics, "")
    return MetricsData([ResourceMetrics(resource, [scope], "")])


def _histogram_points(samples: list, start_ns: int, now: int, point_type: Any) -> list:
    """Prometheus cumulative `le` buckets per label set → OTel per-bucket counts and bounds."""
    series: dict[tuple, dict[str, Any]] = {}
    for s in samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        entry = series.setdefault(tuple(sorted(labels.items())), {"labels": labels, "buckets": [], "sum": 0.0,
                                                                  "count": 0})
        if s.name.endswith("_bucket"):
            entry["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_sum"):
            entry["sum"] = s.value
        elif s.name.endswith("_count"):
            entry["count"] = int(s.value)
    points = []
    for entry in series.values():
        buckets = sorted(entry["buckets"])
        bounds = [le for le, _ in buckets if le != float("inf")]
        counts, previous = [], 0.0
        for _, cumulative in buckets:
            counts.append(int(cumulative - previous))
            previous = cumulative
        points.append(point_type(entry["labels"], start_ns, now, entry["count"], entry["sum"], counts, bounds,
                                 None, None))
    return points


class OtlpMetricsPusher:
    """A daemon thread exporting `registry` every `interval_s`, and once more at `stop()`."""

    def __init__(self, registry: Any, service_name: str, interval_s: float, exporter: Any | None = None) -> None:
        self._registry = registry
        self._resource = otel_resource(service_name)
        self._exporter = exporter or metric_exporter()
        self._interval_s = interval_s
        self._start_ns = time.time_ns()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jarvis-otlp-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.push()

    def push(self, timeout_s: float = 10.0) -> None:
        try:
            self._exporter.export(registry_as_metrics_data(self._registry, self._resource, self._start_ns),
                                  timeout_millis=timeout_s * 1000)
        except Exception as exc:  # a collector that is down must not take the server with it
            log.warning("OTLP metrics export failed: %s", exc)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.push(timeout_s=3.0)  # the last figures, without holding a stopping server for long
        self._exporter.shutdown()
