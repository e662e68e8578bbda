"""Alerts judged in the server: thresholds over a sliding window of finished generations.

`RequestWindow` keeps (time, latency, TTFT, failed) of the generations that
finished in the last `window_s` seconds. `AlertEvaluator.evaluate` compares
p95 latency, p95 TTFT and the error rate (once the window holds
`min_requests`), process memory and queue depth with their thresholds; an
alert that starts firing logs a warning with what the operator needs to look
at and sets `jarvis_alert_active{alert=...}` to 1, and one that recovers logs
that and sets it back to 0. deploy/prometheus/alerts.yml holds the same rules
in PromQL for a Prometheus that scrapes /metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("jarvis.telemetry")


@dataclass(frozen=True)
class FinishedGeneration:
    at: float  # time.monotonic()
    latency_s: float
    ttft_s: float | None
    failed: bool
    request_id: str
    model: str
    adapter: str | None


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class RequestWindow:
    """Finished generations of the last `window_s` seconds (appends are O(1), pruning is amortised)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._items: deque[FinishedGeneration] = deque()

    def add(self, item: FinishedGeneration) -> None:
        self._items.append(item)

    def current(self, now: float | None = None) -> list[FinishedGeneration]:
        horizon = (time.monotonic() if now is None else now) - self.window_s
        while self._items and self._items[0].at < horizon:
            self._items.popleft()
        return list(self._items)


@dataclass(frozen=True)
class AlertRule:
    name: str
    threshold: float
    unit: str
    needs_requests: bool  # judged only once the window holds min_requests


@dataclass(frozen=True)
class ServerSnapshot:
    """What the server looks like now, for the rules that are not about finished requests."""

    in_flight: int
    queue_depth: int
    memory_percent: float
    memory_bytes: int


class AlertEvaluator:
    def __init__(self, settings: Any, window: RequestWindow, set_active: Callable[[str, bool], None]) -> None:
        candidates = [AlertRule("p95_latency", settings.alert_p95_latency_s, "s", True),
                      AlertRule("error_rate", settings.alert_error_rate, "", True),
                      AlertRule("p95_ttft", settings.alert_p95_ttft_s, "s", True),
                      AlertRule("memory", settings.alert_memory_percent, "%", False),
                      AlertRule("queue_depth", settings.alert_queue_depth, "", False)]
        self.rules = [rule for rule in candidates if rule.threshold > 0]
        self.min_requests = settings.alert_min_requests
        self.window = window
        self.active: dict[str, float] = {}
        self._set_active = set_active

    def values(self, items: list[FinishedGeneration], snapshot: ServerSnapshot) -> dict[str, float | None]:
        enough = len(items) >= self.min_requests
        ttfts = [i.ttft_s for i in items if i.ttft_s is not None and not i.failed]
        return {
            "p95_latency": percentile([i.latency_s for i in items if not i.failed], 0.95) if enough else None,
            "error_rate": sum(i.failed for i in items) / len(items) if enough else None,
            "p95_ttft": percentile(ttfts, 0.95) if enough else None,
            "memory": snapshot.memory_percent,
            "queue_depth": float(snapshot.queue_depth),
        }

    def evaluate(self, snapshot: ServerSnapshot, now: float | None = None) -> dict[str, float | None]:
        """Judge every rule now; returns the values it judged (None = not enough data)."""
        items = self.window.current(now)
        values = self.values(items, snapshot)
        for rule in self.rules:
            value = values[rule.name]
            firing = value is not None and value > rule.threshold
            if firing and rule.name not in self.active:
                self.active[rule.name] = value  # type: ignore[assignment]
                self._set_active(rule.name, True)
                log.warning("alert %s firing: %s over the threshold %s (%s)", rule.name, _fmt(value, rule.unit),
                            _fmt(rule.threshold, rule.unit), self.context(items, snapshot))
            elif not firing and rule.name in self.active:
                del self.active[rule.name]
                self._set_active(rule.name, False)
                shown = "no data" if value is None else _fmt(value, rule.unit)
                log.warning("alert %s recovered: %s, threshold %s", rule.name, shown,
                            _fmt(rule.threshold, rule.unit))
        return values

    def context(self, items: list[FinishedGeneration], snapshot: ServerSnapshot) -> str:
        """Diagnostic context: the window, the load now, and the slowest or failed requests in it."""
        failed = [i for i in items if i.failed]
        slowest = sorted((i for i in items if not i.failed), key=lambda i: i.latency_s, reverse=True)[:3]
        parts = [f"window {self.window.window_s:g}s: {len(items)} requests, {len(failed)} failed",
                 f"in-flight {snapshot.in_flight}", f"queue {snapshot.queue_depth}",
                 f"rss {snapshot.memory_bytes / 2**20:.0f} MiB ({snapshot.memory_percent:.1f}%)"]
        if slowest:
            parts.append("slowest " + ", ".join(f"{i.request_id} {i.latency_s:.3f}s model={i.model} "
                                                f"adapter={i.adapter or 'none'}" for i in slowest))
        if failed:
            parts.append("failed " + ", ".join(i.request_id for i in failed[-3:]))
        return "; ".join(parts)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:.3g}{unit}"
