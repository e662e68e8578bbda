"""Telemetry plugin: OpenTelemetry traces and metrics, Prometheus /metrics, alerts."""
