"""The telemetry recorder in-process: error logs with ids, alert firing and recovery, spans of failures, OTLP.

These drive `TelemetryRecorder` with real `PreparedRequest`s and real
exceptions (the engine is not the subject here), an in-memory span exporter
from the OpenTelemetry SDK, and the real OTLP exporter classes.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk")

from jarvis.engine import GenerationResult, PreparedRequest, RequestContext  # noqa: E402
from jarvis.plugins.telemetry.alerts import ServerSnapshot, percentile  # noqa: E402
from jarvis.plugins.telemetry.recorder import TelemetryRecorder  # noqa: E402
from jarvis.plugins.telemetry.settings import PREFIX, TelemetrySettings  # noqa: E402

CALM = ServerSnapshot(in_flight=0, queue_depth=0, memory_percent=1.0, memory_bytes=10 * 2**20)


def recorder(**overrides) -> TelemetryRecorder:
    settings = TelemetrySettings(_env_file=None, **{"gpu": False, "alert_min_requests": 2, "alert_window_s": 10,
                                                    "alert_p95_latency_s": 0, "alert_p95_ttft_s": 0,
                                                    "alert_error_rate": 0.4, **overrides})
    return TelemetryRecorder(settings)


def request(adapter: str | None = None) -> PreparedRequest:
    return PreparedRequest(prompt="hi", model="base-model", adapter=adapter, max_tokens=4,
                             context=RequestContext(engine="llama_cpp"))


def metric_line(rec: TelemetryRecorder, prefix: str) -> list[str]:
    return [line for line in rec.metrics.render()[0].decode().splitlines() if line.startswith(prefix)]


def test_error_rate_alert_fires_with_context_and_recovers(caplog):
    rec = recorder()
    caplog.set_level(logging.INFO, logger="jarvis.telemetry")
    ok = request()
    rec.started(ok)
    rec.finished(ok, GenerationResult("x", "length", 3, 4), None)
    failed = request(adapter="pirate")
    rec.started(failed)
    rec.finished(failed, None, RuntimeError("engine exploded"))

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"generation failed: RuntimeError: engine exploded (request_id={failed.request_id} "
                      "model=base-model adapter=pirate engine=llama_cpp trace_id=none)"]
    assert 'jarvis_request_errors_total{adapter="pirate",error_type="RuntimeError",model="base-model"} 1.0' in \
        metric_line(rec, "jarvis_request_errors_total")

    values = rec.alerts.evaluate(CALM)
    assert values["error_rate"] == 0.5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("alert error_rate firing: 0.5 over the threshold 0.4")
    assert "2 requests, 1 failed" in warnings[0] and f"failed {failed.request_id}" in warnings[0]
    assert 'jarvis_alert_active{alert="error_rate"} 1.0' in metric_line(rec, "jarvis_alert_active")
    rec.alerts.evaluate(CALM)  # still firing: no second warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    import time

    rec.alerts.evaluate(CALM, now=time.monotonic() + 11)  # the window has moved past both requests
    assert "alert error_rate recovered: no data, threshold 0.4" in caplog.text
    assert 'jarvis_alert_active{alert="error_rate"} 0.0' in metric_line(rec, "jarvis_alert_active")


def test_memory_and_queue_alerts_read_the_server_now():
    rec = recorder(alert_memory_percent=50, alert_queue_depth=2)
    busy = ServerSnapshot(in_flight=5, queue_depth=3, memory_percent=75.0, memory_bytes=2**30)
    rec.alerts.evaluate(busy)
    assert set(rec.alerts.active) == {"memory", "queue_depth"}
    rec.alerts.evaluate(CALM)
    assert rec.alerts.active == {}


def test_cancelled_generations_are_not_errors():
    rec = recorder()
    gen = request()
    rec.started(gen)
    rec.finished(gen, None, GeneratorExit())
    assert metric_line(rec, "jarvis_requests_total") == [
        'jarvis_requests_total{adapter="none",api="openai",model="base-model",operation="text_completion",'
        'status="cancelled"} 1.0']
    assert rec.window.current() == []


def test_a_failed_generation_span_records_the_error_and_the_log_names_its_trace(caplog):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from jarvis.plugins.telemetry.tracing import Tracing

    exporter = InMemorySpanExporter()
    rec = recorder()
    rec.tracing = Tracing("jarvis-test", 10, exporter=exporter)
    gen = request()
    rec.started(gen)
    rec.finished(gen, None, ValueError("bad logits"))
    rec.tracing.provider.force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    assert [e.name for e in span.events] == ["exception"]
    assert f"trace_id={span.context.trace_id:032x})" in caplog.text
    rec.stop()


def test_otlp_protocol_comes_from_the_standard_variables(monkeypatch):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

    from jarvis.errors import ConfigError
    from jarvis.plugins.telemetry.tracing import span_exporter

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    assert isinstance(span_exporter(), HttpSpanExporter)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert isinstance(span_exporter(), GrpcSpanExporter)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        span_exporter()


def test_histograms_reach_otlp_with_per_bucket_counts():
    from jarvis.plugins.telemetry.otlp_metrics import registry_as_metrics_data
    from jarvis.plugins.telemetry.tracing import otel_resource

    rec = recorder()
    for latency in (0.07, 0.3, 0.4, 400.0):
        rec.metrics.record("m", None, "chat", "ok", latency_s=latency, ttft_s=None, prompt_tokens=1,
                           completion_tokens=1, error_type=None)
    data = registry_as_metrics_data(rec.metrics.registry, otel_resource("t"), 0)
    metrics = {m.name: m for m in data.resource_metrics[0].scope_metrics[0].metrics}
    (point,) = metrics["jarvis_request_duration_seconds"].data.data_points
    assert point.count == 4 and sum(point.bucket_counts) == 4
    assert len(point.bucket_counts) == len(point.explicit_bounds) + 1 and point.bucket_counts[-1] == 1
    assert point.bucket_counts[point.explicit_bounds.index(0.1)] == 1
    assert metrics["jarvis_requests_total"].data.is_monotonic


def test_settings_errors_name_the_variable_and_the_fix(monkeypatch):
    from jarvis.settings import SettingsError, load_settings

    monkeypatch.setenv("JARVIS_TELEMETRY_ALERT_ERROR_RATE", "2")
    with pytest.raises(SettingsError) as info:
        load_settings(TelemetrySettings, prefix=PREFIX)
    (problem,) = info.value.problems
    assert problem.setting == "JARVIS_TELEMETRY_ALERT_ERROR_RATE" and "between 0 and 1" in problem.fix


def test_percentile_is_nearest_rank():
    assert percentile([], 0.95) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0


def test_tool_calls_are_counted_by_function_and_put_on_the_span():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from jarvis.engine import ToolCallDelta, ToolUse
    from jarvis.plugins.telemetry.tracing import Tracing

    exporter = InMemorySpanExporter()
    rec = recorder()
    rec.tracing = Tracing("jarvis-test", 10, exporter=exporter)
    gen = PreparedRequest(prompt=None, model="base-model", kind="chat", max_tokens=32,
                            context=RequestContext(engine="llama_cpp"),
                            tool_use=ToolUse(({"name": "get_weather"}, {"name": "get_time"}), "required"))
    calls = [ToolCallDelta(0, "call_a", "get_weather", "{}"), ToolCallDelta(1, "call_b", "get_weather", "{}"),
             ToolCallDelta(2, "call_c", "get_time", "{}")]
    rec.started(gen)
    rec.finished(gen, GenerationResult("", "tool_calls", 10, 20, tool_calls=calls), None)
    rec.tracing.provider.force_flush()
    assert sorted(metric_line(rec, "jarvis_tool_calls_total")) == [
        'jarvis_tool_calls_total{adapter="none",model="base-model",tool="get_time"} 1.0',
        'jarvis_tool_calls_total{adapter="none",model="base-model",tool="get_weather"} 2.0']
    (span,) = exporter.get_finished_spans()
    assert span.attributes["jarvis.request.tools"] == ("get_weather", "get_time")
    assert span.attributes["jarvis.request.tool_choice"] == "required"
    assert span.attributes["jarvis.tool_calls.count"] == 3
    assert span.attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert [(e.name, e.attributes["gen_ai.tool.name"], e.attributes["gen_ai.tool.call.id"]) for e in span.events] == [
        ("gen_ai.tool.call", "get_weather", "call_a"), ("gen_ai.tool.call", "get_weather", "call_b"),
        ("gen_ai.tool.call", "get_time", "call_c")]
    rec.stop()
