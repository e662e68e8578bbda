"""Traces over OTLP/HTTP from a real server to a real receiver: server + GenAI spans, linked and correct.

The receiver is an http.server on 127.0.0.1 that decodes what the OTLP/HTTP
exporter posts (ExportTraceServiceRequest, ExportMetricsServiceRequest) with
the opentelemetry-proto package, exactly as a collector would.
"""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

API_KEY = "sk-telemetry-secret-4242"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


class OtlpReceiver:
    """Collects decoded OTLP spans and metric names posted to /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list = []
        self.metric_names: set[str] = set()
        self.raw = bytearray()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.raw += body
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    receiver.spans += [span for rs in request.resource_spans for ss in rs.scope_spans
                                       for span in ss.spans]
                    reply = ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest.FromString(body)
                    receiver.metric_names |= {m.name for rm in request.resource_metrics for sm in rm.scope_metrics
                                              for m in sm.metrics}
                    reply = ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                payload = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(span) -> dict:
    from google.protobuf.json_format import MessageToDict

    out = {}
    for kv in span.attributes:
        value = MessageToDict(kv.value)
        out[kv.key] = ([next(iter(v.values())) for v in value["arrayValue"]["values"]]
                       if "arrayValue" in value else next(iter(value.values())))
    return out


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced_server(receiver, jarvis_server):  # the receiver outlives the server: its last export lands
    return jarvis_server(JARVIS_TELEMETRY_OTLP="true", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                         OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", JARVIS_TELEMETRY_SPAN_EXPORT_DELAY_MS="100",
                         JARVIS_TELEMETRY_METRICS_EXPORT_INTERVAL_S="1", JARVIS_API_KEYS=API_KEY,
                         JARVIS_TELEMETRY_METRICS_REQUIRE_API_KEY="true", JARVIS_LLAMA_N_THREADS="1")


def wait_for(condition, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return condition()


@pytest.mark.slow
def test_spans_follow_the_genai_conventions_and_link_to_the_server_span(traced_server, receiver):
    from openai import OpenAI

    client = OpenAI(base_url=traced_server.v1, api_key=API_KEY)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a colour."}],
                                          max_tokens=6, temperature=0.0)
    stream = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0.5,
                                       stream=True, stream_options={"include_usage": True})
    streamed_usage = [c.usage for c in stream if c.usage][-1]
    continued = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4,
                                          extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"})

    generations = wait_for(lambda: [s for s in receiver.spans if "jarvis.request.id" in attributes(s)]
                           if len([s for s in receiver.spans if "jarvis.request.id" in attributes(s)]) >= 3
                           else None)
    assert generations and len(generations) == 3, receiver.spans
    servers = {s.span_id: s for s in receiver.spans if s.kind == s.SPAN_KIND_SERVER}
    expected = [("chat", chat.usage, 6, "chat/completions"), ("text_completion", streamed_usage, 5, "completions"),
                ("text_completion", continued.usage, 4, "completions")]
    for span, (operation, usage, max_tokens, path) in zip(generations, expected):
        attrs = attributes(span)
        assert span.name == f"{operation} {model}"
        assert attrs["gen_ai.operation.name"] == operation
        assert attrs["gen_ai.request.model"] == model
        assert int(attrs["gen_ai.request.max_tokens"]) == max_tokens
        assert int(attrs["gen_ai.usage.input_tokens"]) == usage.prompt_tokens
        assert int(attrs["gen_ai.usage.output_tokens"]) == usage.completion_tokens
        assert attrs["gen_ai.response.finish_reasons"] in (["length"], ["stop"])
        assert attrs["jarvis.engine"] == "llama_cpp" and attrs["jarvis.adapter"] == ""
        assert 0 < attrs["jarvis.time_to_first_token_s"] < (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
        assert [e.name for e in span.events] == ["gen_ai.first_token"]
        parent = servers[span.parent_span_id]  # the generation is a child of its HTTP request's span
        assert parent.trace_id == span.trace_id
        assert parent.name == f"POST /v1/{path}"
        assert int(attributes(parent)["http.response.status_code"]) == 200
    assert attributes(generations[0])["gen_ai.request.temperature"] == 0.0
    incoming = servers[generations[2].parent_span_id]
    assert incoming.trace_id.hex() == TRACE_ID and incoming.parent_span_id.hex() == PARENT_SPAN_ID
    assert generations[0].trace_id.hex() != TRACE_ID  # requests without traceparent start their own trace

    assert wait_for(lambda: "jarvis_requests_total" in receiver.metric_names), receiver.metric_names
    assert {"jarvis_request_duration_seconds", "jarvis_completion_tokens_total"} <= receiver.metric_names
    assert API_KEY.encode() not in receiver.raw  # no secret in any span or metric


@pytest.mark.slow
def test_metrics_endpoint_can_require_an_api_key(traced_server):
    assert httpx.get(f"{traced_server.base_url}/metrics").status_code == 401
    reply = httpx.get(f"{traced_server.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200 and "jarvis_requests_total" in reply.text
    assert API_KEY not in reply.text and API_KEY not in traced_server.log()
