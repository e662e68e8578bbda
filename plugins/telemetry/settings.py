"""Telemetry settings (`JARVIS_TELEMETRY_*`): what is measured, where it goes, when alerts fire.

OTLP endpoints, protocol, headers and sampling come from the standard
`OTEL_EXPORTER_OTLP_*` / `OTEL_TRACES_SAMPLER*` variables; these settings only
switch export on and tune what Jarvis itself decides.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "JARVIS_TELEMETRY_"


def _fix(text: str) -> dict[str, str]:
    return {"fix": text}


class TelemetrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    enabled: bool = Field(True, description="The plugin's switch: metrics at GET /metrics, the status line, "
                                            "alerts (and OTLP export when JARVIS_TELEMETRY_OTLP is on).",
                          json_schema_extra=_fix("set JARVIS_TELEMETRY_ENABLED to true or false"))
    otlp: bool = Field(False, description="Export traces and metrics over OTLP (OTEL_EXPORTER_OTLP_* "
                                          "variables pick endpoint and protocol: http/protobuf or grpc).",
                       json_schema_extra=_fix("set JARVIS_TELEMETRY_OTLP to true or false"))
    service_name: str = Field("jarvis", min_length=1,
                              description="service.name of spans and metrics (OTEL_SERVICE_NAME wins if set).",
                              json_schema_extra=_fix("set JARVIS_TELEMETRY_SERVICE_NAME to a non-empty name"))
    span_export_delay_ms: int = Field(5000, ge=1, le=600_000,
                                      description="Batch span processor delay between exports.",
                                      json_schema_extra=_fix("set JARVIS_TELEMETRY_SPAN_EXPORT_DELAY_MS "
                                                             "between 1 and 600000"))
    metrics_export_interval_s: float = Field(15.0, gt=0, le=3600,
                                             description="How often metrics are pushed over OTLP.",
                                             json_schema_extra=_fix("set JARVIS_TELEMETRY_METRICS_EXPORT_INTERVAL_S "
                                                                    "between 0 and 3600"))
    metrics_access: str = Field("open", pattern="^(open|key|admin)$",
                                description="Who may read GET /metrics: open (a Prometheus scrape needs no key), "
                                            "key (any API key) or admin.",
                                json_schema_extra=_fix("set JARVIS_TELEMETRY_METRICS_ACCESS to open, key or admin"))
    metrics_require_api_key: bool = Field(False, description="Older name of JARVIS_TELEMETRY_METRICS_ACCESS=key.",
                                          json_schema_extra=_fix("set JARVIS_TELEMETRY_METRICS_REQUIRE_API_KEY "
                                                                 "to true or false"))

    @property
    def metrics_level(self) -> str:
        if self.metrics_access == "open" and self.metrics_require_api_key:
            return "key"
        return self.metrics_access
    gpu: bool = Field(True, description="GPU utilisation and memory per device when NVML sees GPUs.",
                      json_schema_extra=_fix("set JARVIS_TELEMETRY_GPU to true or false"))
    log_interval_s: float = Field(60.0, ge=0, le=86_400,
                                  description="Seconds between status lines (requests/s, tokens/s, memory); "
                                              "0 = no status line.",
                                  json_schema_extra=_fix("set JARVIS_TELEMETRY_LOG_INTERVAL_S between 0 and 86400"))
    alert_window_s: float = Field(300.0, gt=0, le=86_400,
                                  description="Sliding window the alert thresholds are evaluated over.",
                                  json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_WINDOW_S between 0 and 86400"))
    alert_check_interval_s: float = Field(5.0, gt=0, le=3600, description="How often alerts are evaluated.",
                                          json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_CHECK_INTERVAL_S "
                                                                 "between 0 and 3600"))
    alert_min_requests: int = Field(5, ge=1, description="Requests the window needs before rate and "
                                                         "percentile alerts are judged.",
                                    json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_MIN_REQUESTS to 1 or more"))
    alert_p95_latency_s: float = Field(30.0, ge=0, description="p95 request latency threshold; 0 = off.",
                                       json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_P95_LATENCY_S to "
                                                              "seconds (0 = off)"))
    alert_error_rate: float = Field(0.05, ge=0, le=1, description="Failed / all requests threshold; 0 = off.",
                                    json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_ERROR_RATE between 0 and 1"))
    alert_p95_ttft_s: float = Field(5.0, ge=0, description="p95 time to first token threshold; 0 = off.",
                                    json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_P95_TTFT_S to seconds "
                                                           "(0 = off)"))
    alert_memory_percent: float = Field(90.0, ge=0, le=100,
                                        description="Process resident memory as % of the machine's; 0 = off.",
                                        json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_MEMORY_PERCENT "
                                                               "between 0 and 100"))
    alert_queue_depth: int = Field(16, ge=0, description="Requests waiting for an engine slot; 0 = off.",
                                   json_schema_extra=_fix("set JARVIS_TELEMETRY_ALERT_QUEUE_DEPTH to a count "
                                                          "(0 = off)"))
