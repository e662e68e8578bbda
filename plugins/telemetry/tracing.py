"""Traces: a server span per HTTP request and a GenAI child span per generation, exported over OTLP.

The server span comes from an ASGI middleware that continues an incoming W3C
`traceparent` and makes the span current for the request, so the generation
span (opened in `jarvis_request_started`) is its child. Generation spans follow
the OpenTelemetry GenAI semantic conventions (`gen_ai.*` attributes); the time
to the first token is an event on the span and a `jarvis.*` attribute.
Only methods, paths, status codes and generation figures are recorded —
never headers (API keys) or prompt and completion text.
"""

from __future__ import annotations

import os
from typing import Any

from jarvis.errors import ConfigError

UNTRACED_PATHS = ("/metrics", "/health")
PROTOCOLS = ("http/protobuf", "grpc")


def otlp_protocol(signal: str) -> str:
    """The OTLP protocol for `signal` (traces, metrics) from the standard variables; http/protobuf by default."""
    name = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    value = os.environ.get(name) or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if value not in PROTOCOLS:
        raise ConfigError(name if os.environ.get(name) else "OTEL_EXPORTER_OTLP_PROTOCOL", value,
                          "Jarvis exports OTLP as http/protobuf or grpc",
                          "set OTEL_EXPORTER_OTLP_PROTOCOL to http/protobuf or grpc")
    return value


def otel_resource(service_name: str) -> Any:
    from opentelemetry.sdk.resources import Resource

    import jarvis

    attributes = {"service.version": jarvis.__version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    return Resource.create(attributes)  # merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME


def span_exporter() -> Any:
    if otlp_protocol("traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


class Tracing:
    """A tracer provider of its own (the global one is left to the host), its middleware and GenAI spans."""

    def __init__(self, service_name: str, export_delay_ms: int, exporter: Any | None = None) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=otel_resource(service_name))
        self.provider.add_span_processor(BatchSpanProcessor(exporter or span_exporter(),
                                                            schedule_delay_millis=export_delay_ms))
        self.tracer = self.provider.get_tracer("jarvis.plugins.telemetry")
        self.propagator = TraceContextTextMapPropagator()

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is still queued

    # --- the server span ------------------------------------------------------------------------

    def middleware(self, app: Any) -> Any:
        """ASGI middleware factory: a SERVER span around every HTTP request but health checks and scrapes."""
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracer, propagator = self.tracer, self.propagator

        async def traced(scope: dict, receive: Any, send: Any) -> None:
            path = scope.get("path", "")
            if scope["type"] != "http" or path.startswith(UNTRACED_PATHS):
                await app(scope, receive, send)
                return
            carrier = {}
            for key, value in scope.get("headers", ()):
                if key in (b"traceparent", b"tracestate"):  # the only headers read; none is recorded
                    carrier[key.decode()] = value.decode("latin-1")
            method = scope.get("method", "GET")
            client = scope.get("client") or (None, None)
            span = tracer.start_span(f"{method} {path}", context=propagator.extract(carrier), kind=SpanKind.SERVER,
                                     attributes={"http.request.method": method, "url.path": path,
                                                 "url.scheme": scope.get("scheme", "http"),
                                                 "network.protocol.version": scope.get("http_version", "1.1"),
                                                 "client.address": client[0] or ""})
            token = context.attach(trace.set_span_in_context(span))
            status = {"code": 500}

            async def send_status(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            except BaseException as exc:
                span.record_exception(exc)
                raise
            finally:
                span.set_attribute("http.response.status_code", status["code"])
                if status["code"] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                    span.set_attribute("error.type", str(status["code"]))
                context.detach(token)
                span.end()

        return traced

    # --- the generation span --------------------------------------------------------------------

    def start_generation(self, request: Any) -> Any:
        """A child of the current (server) span, named `{operation} {model}` as GenAI spans are."""
        from opentelemetry.trace import SpanKind

        from jarvis.plugins.telemetry.metrics import operation_of

        operation = operation_of(request.kind)
        attributes = {"gen_ai.operation.name": operation, "gen_ai.request.model": request.model,
                      "jarvis.api": request.context.api,
                      "gen_ai.system": "jarvis", "gen_ai.request.temperature": request.temperature,
                      "gen_ai.request.top_p": request.top_p, "jarvis.request.id": request.request_id,
                      "jarvis.engine": request.engine or "", "jarvis.adapter": request.adapter or ""}
        if request.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = request.max_tokens
        if request.seed is not None:
            attributes["gen_ai.request.seed"] = request.seed
        tool_use = request.tool_use
        if tool_use is not None:
            attributes["jarvis.request.tools"] = [f["name"] for f in tool_use.tools]
            attributes["jarvis.request.tool_choice"] = tool_use.name or tool_use.choice
        return self.tracer.start_span(f"{operation} {request.model}", kind=SpanKind.INTERNAL, attributes=attributes)

    def finish_generation(self, span: Any, request: Any, result: Any, error: BaseException | None,
                          first_token_unix_ns: int | None, ttft_s: float | None, status: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        if ttft_s is not None:
            span.set_attribute("jarvis.time_to_first_token_s", ttft_s)
            span.add_event("gen_ai.first_token", timestamp=first_token_unix_ns)
        if result is not None:
            span.set_attribute("gen_ai.response.model", request.adapter or request.model)
            span.set_attribute("gen_ai.response.id", request.request_id)
            span.set_attribute("gen_ai.usage.input_tokens", result.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", result.completion_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
            calls = result.tool_calls
            if calls:  # GenAI conventions' tool attributes, one event per call
                span.set_attribute("jarvis.tool_calls.count", len(calls))
                span.set_attribute("jarvis.tool_calls.names", [c.name or "" for c in calls])
                for call in calls:
                    span.add_event("gen_ai.tool.call", {"gen_ai.tool.name": call.name or "",
                                                        "gen_ai.tool.call.id": call.id or ""})
        if status == "cancelled":
            span.set_attribute("gen_ai.response.finish_reasons", ["cancelled"])
        elif error is not None:
            span.record_exception(error)
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:300]))
        span.end()


def current_trace_id(span: Any | None = None) -> str | None:
    """The trace id (32 hex digits) of `span` or of the current span, if one is recording."""
    from opentelemetry import trace

    ctx = (span or trace.get_current_span()).get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
