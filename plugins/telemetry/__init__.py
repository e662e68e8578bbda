"""Telemetry plugin: OpenTelemetry traces and metrics, Prometheus /metrics, alerts.

Built only on hooks: `jarvis_request_started/finished` observe every
generation, `jarvis_register_middleware` adds the HTTP server span (when OTLP
export is on), `jarvis_register_routes` mounts GET /metrics, and the lifespan
hooks run the status line, the alert checks and the OTLP metric pushes.
Settings are `JARVIS_TELEMETRY_*` (see .env.example); with the `otel` extra
missing the plugin says so once and stays out of the way.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from jarvis import hookimpl

if TYPE_CHECKING:
    from jarvis.server import JarvisServer

log = logging.getLogger("jarvis.telemetry")

#: The recorder of the app being built or served (one app per process).
_current: Any = None


def _new_recorder() -> Any:
    from jarvis.plugins.telemetry.settings import PREFIX, TelemetrySettings
    from jarvis.settings import load_settings

    settings = load_settings(TelemetrySettings, prefix=PREFIX)
    if not settings.enabled:
        return None
    try:
        from jarvis.plugins.telemetry.recorder import TelemetryRecorder

        return TelemetryRecorder(settings)
    except ImportError as exc:
        log.warning("telemetry off: %s (install the extra: pip install 'jarvis-llm[otel]')", exc)
        return None


class _AuditEvents(logging.Handler):
    """Audit records (`jarvis.auth.audit`, logger `jarvis.audit`) to the recorder: a counter, a span event."""

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "audit", None)
        if _current is not None and event is not None:
            _current.audit(event)


_audit_handler = _AuditEvents()


@hookimpl
def jarvis_check_settings(settings: Any) -> list[Any]:
    from jarvis.plugins.telemetry.settings import PREFIX, TelemetrySettings
    from jarvis.settings import SettingsError, load_settings

    try:
        load_settings(TelemetrySettings, prefix=PREFIX)
    except SettingsError as exc:
        return exc.problems
    return []


@hookimpl
def jarvis_register_routes(register: Any) -> None:
    global _current
    _current = _new_recorder()
    if _current is not None:
        from jarvis.plugins.telemetry.endpoint import metrics_endpoint

        register(metrics_endpoint(_current.settings.metrics_level))


@hookimpl
def jarvis_register_middleware(register: Any) -> None:
    if _current is not None and _current.tracing is not None:
        register(_current.tracing.middleware)


@hookimpl
def jarvis_startup(server: JarvisServer) -> None:
    server.extensions["telemetry"] = _current
    if _current is not None:
        if _current.settings.metrics_level != "open" and not server.keys.enabled:
            log.warning("JARVIS_TELEMETRY_METRICS_ACCESS=%s has no effect: the server has no API keys "
                        "(JARVIS_API_KEYS), so GET /metrics is open", _current.settings.metrics_level)
        _current.start(server.runtime)
        logging.getLogger("jarvis.audit").addHandler(_audit_handler)


@hookimpl
def jarvis_shutdown(server: JarvisServer) -> None:
    recorder = server.extensions.get("telemetry")
    if recorder is not None:
        logging.getLogger("jarvis.audit").removeHandler(_audit_handler)
        recorder.stop()


@hookimpl
def jarvis_request_started(request: Any) -> None:
    if _current is not None:
        _current.started(request)


@hookimpl
def jarvis_request_finished(request: Any, result: Any, error: BaseException | None) -> None:
    if _current is not None:
        _current.finished(request, result, error)
