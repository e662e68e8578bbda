"""The replica pool behind the upstream engine: which OpenAI-compatible server takes the next request.

`UpstreamPool` holds one `Upstream` per base URL (one for JARVIS_UPSTREAM_URL,
several for JARVIS_UPSTREAMS), keeps each one's score and decides, per
request, where it goes:

- balancing: the eligible upstream with the fewest outstanding requests; ties
  go round-robin;
- health: an upstream is up or down (its health check, backends/upstream/monitor.py,
  says which; a connection error on a request marks it down at once); a down
  upstream is tried only when no other is left;
- circuit breaking: JARVIS_UPSTREAM_FAILURE_THRESHOLD consecutive failures
  (requests or checks) open the circuit for JARVIS_UPSTREAM_COOLDOWN seconds;
  then it is half-open: one probe request decides between closed and open again;
- adapters: a request for an adapter goes only to upstreams holding it.

No network here: the engine (backends/upstream/engine.py) sends the requests
and reports each `Attempt`'s outcome.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from jarvis.errors import ConfigError, EngineUnavailable

log = logging.getLogger("jarvis.backends.upstream.pool")

Circuit = Literal["closed", "open", "half_open"]

_ENTRY = re.compile(r"^(?:(?P<key>\S+?)@)?(?P<url>https?://[\w.\-\[\]:]+(?:/[\w.\-~/%]*)?)$")


def shown_url_list(text: str) -> str:
    """The JARVIS_UPSTREAMS value with every key masked, for error messages and logs."""
    return ",".join(re.sub(r"^\S+?@(?=https?://)", "***@", part.strip()) for part in text.split(","))


def parse_upstreams(text: str, default_key: str | None) -> list[tuple[str, str | None]]:
    """`url,key@url,...` → [(url without the trailing slash, key or the default key)]."""
    entries = [part.strip() for part in text.split(",")]
    fix = ("set JARVIS_UPSTREAMS to comma-separated base URLs ending in /v1, each optionally prefixed by its key "
           "as key@url, e.g. http://10.0.0.5:8000/v1,KEY@http://10.0.0.6:8000/v1")
    if not any(entries):
        raise ConfigError("JARVIS_UPSTREAMS", text, "the list of upstreams is empty", fix)
    parsed: list[tuple[str, str | None]] = []
    for entry in entries:
        match = _ENTRY.match(entry)
        if not entry or match is None:
            raise ConfigError("JARVIS_UPSTREAMS", shown_url_list(text),
                              f"{shown_url_list(entry) or 'an empty entry'!r} is not an http(s) URL", fix)
        url = match.group("url").rstrip("/")
        if any(url == seen for seen, _ in parsed):
            raise ConfigError("JARVIS_UPSTREAMS", shown_url_list(text), f"{url} is listed twice",
                              "list each upstream once")
        parsed.append((url, match.group("key") or default_key))
    return parsed


@dataclass(eq=False)
class Upstream:
    """One OpenAI-compatible server and what the pool knows of it."""

    url: str
    api_key: str | None = None
    #: The monitor's client: health checks and adapter calls.
    client: httpx.AsyncClient | None = None
    #: The request path's client (an aiohttp.ClientSession): completions, streams and embeddings.
    session: Any = None
    #: Up while its last check (or request) succeeded; a down upstream is tried only when no other is left.
    up: bool = True
    #: False when it does not serve the pool's model (it is then never chosen).
    serves_model: bool = True
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    retries: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    latency_ms: float | None = None  # moving average of successful requests' durations
    adapters: set[str] = field(default_factory=set)
    #: Adapters it refused to load (not retried until it rejoins).
    refused: dict[str, str] = field(default_factory=dict)
    _circuit: Circuit = "closed"
    _open_until: float = 0.0
    _probing: bool = False

    # --- circuit ---------------------------------------------------------------------------------

    def circuit(self, now: float | None = None) -> Circuit:
        if self._circuit == "open" and (now or time.monotonic()) >= self._open_until:
            return "half_open"
        return self._circuit

    def admits(self, now: float) -> bool:
        """Whether the circuit lets a request through now (a half-open one lets exactly one probe)."""
        state = self.circuit(now)
        return state == "closed" or (state == "half_open" and not self._probing)

    def record_success(self, latency_s: float | None = None) -> None:
        """A request answered: the streak ends, and a half-open circuit closes (an open one waits its probe)."""
        self.up, self.consecutive_failures = True, 0
        if self.circuit() == "half_open":
            log.warning("upstream %s: circuit closed (the probe succeeded)", self.url)
            self._circuit = "closed"
        if latency_s is not None:
            ms = latency_s * 1000
            self.latency_ms = ms if self.latency_ms is None else 0.8 * self.latency_ms + 0.2 * ms

    def record_failure(self, error: str, cooldown: float, threshold: int, *, down: bool = False) -> None:
        """A failed request or check; `down` also marks the upstream down (it could not be reached).
        The circuit opens at `threshold` consecutive failures, and at once when it was half-open."""
        now = time.monotonic()
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = error
        if down:
            self.up = False
        state = self.circuit(now)
        if state == "half_open" or (state == "closed" and self.consecutive_failures >= threshold):
            self._circuit, self._open_until = "open", now + cooldown
            log.log(logging.WARNING if state == "closed" else logging.INFO,
                    "upstream %s: circuit open for %.1f s after %d consecutive failures (%s)", self.url,
                    cooldown, self.consecutive_failures, error)

    def begin(self, now: float) -> bool:
        """Count a request sent to it; True when it is the half-open circuit's one probe."""
        self.outstanding += 1
        self.requests += 1
        if self.circuit(now) == "half_open":
            self._circuit, self._probing = "half_open", True
            return True
        return False

    def end(self, probe: bool) -> None:
        """The request is over. A probe that decided nothing (the client went away) frees the probe slot."""
        self.outstanding -= 1
        if probe:
            self._probing = False
            if self._circuit == "half_open":  # undecided: still half-open (open, cool-down already over)
                self._circuit = "open"

    def state(self, now: float | None = None) -> str:
        """Its state and why, for the 503 message."""
        now = now or time.monotonic()
        circuit = self.circuit(now)
        if not self.serves_model:
            return f"{self.url} does not serve the model ({self.last_error})"
        if circuit == "open":
            return f"{self.url} circuit open for {self._open_until - now:.1f} s more ({self.last_error})"
        if circuit == "half_open" and self._probing:
            return f"{self.url} half-open, its probe request is in flight"
        if not self.up:
            return f"{self.url} down ({self.last_error})"
        return f"{self.url} up"

    def metrics(self) -> dict[str, Any]:
        return {"url": self.url, "up": self.up, "serves_model": self.serves_model, "circuit": self.circuit(),
                "outstanding": self.outstanding, "requests": self.requests, "failures": self.failures,
                "retries": self.retries, "consecutive_failures": self.consecutive_failures,
                "last_error": self.last_error,
                "latency_ms": round(self.latency_ms, 1) if self.latency_ms is not None else None,
                "adapters": sorted(self.adapters)}


class UpstreamPool:
    """Chooses an upstream per request and keeps every upstream's score."""

    def __init__(self, upstreams: list[Upstream], *, max_attempts: int = 3, failure_threshold: int = 3,
                 cooldown: float = 10.0) -> None:
        self.upstreams = upstreams
        self.max_attempts = max_attempts
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._turn = 0  # round-robin among the least loaded

    def attempt(self, adapter: str | None = None, exclude: list[Upstream] | tuple = ()) -> Attempt:
        """Send the next attempt to `choose`'s upstream; the caller closes it when the request is over."""
        upstream = self.choose(adapter, exclude)
        return Attempt(self, upstream, upstream.begin(time.monotonic()), time.monotonic())

    def choose(self, adapter: str | None = None, exclude: list[Upstream] | tuple = ()) -> Upstream:
        """The upstream for the next attempt: up and admitted by its circuit, fewest outstanding, round-robin.

        When no upstream is up, a down one whose circuit admits is tried (it may be back before its next
        check). Raises 503 naming every upstream's state when none can take the request."""
        now = time.monotonic()
        candidates = [u for u in self.upstreams if u not in exclude and u.serves_model
                      and (adapter is None or adapter in u.adapters) and u.admits(now)]
        chosen = self._least_loaded([u for u in candidates if u.up] or candidates)
        if chosen is None:
            raise self.unavailable(adapter, exclude)
        return chosen

    def _least_loaded(self, candidates: list[Upstream]) -> Upstream | None:
        if not candidates:
            return None
        n = len(self.upstreams)
        order = sorted(candidates, key=lambda u: (u.outstanding, (self.upstreams.index(u) - self._turn) % n))
        chosen = order[0]
        self._turn = (self.upstreams.index(chosen) + 1) % n
        return chosen

    def unavailable(self, adapter: str | None = None, tried: list[Upstream] | tuple = ()) -> EngineUnavailable:
        now = time.monotonic()
        parts = []
        for u in self.upstreams:
            if adapter is not None and adapter not in u.adapters:
                parts.append(f"{u.url} does not hold adapter {adapter!r}")
            elif u in tried:
                parts.append(f"{u.url} failed ({u.last_error})")
            else:
                parts.append(u.state(now))
        what = f"adapter {adapter!r}" if adapter else "this request"
        return EngineUnavailable(f"No upstream can take {what}: {'; '.join(parts)}.", code="no_upstream_available")

    def record_failure(self, upstream: Upstream, error: str, *, down: bool = False) -> None:
        upstream.record_failure(error, self.cooldown, self.failure_threshold, down=down)

    def describe(self) -> list[dict[str, Any]]:
        return [u.metrics() for u in self.upstreams]


@dataclass
class Attempt:
    """One request on one upstream: its outcome goes to the upstream's score and circuit."""

    pool: UpstreamPool
    upstream: Upstream
    probe: bool
    started: float
    decided: bool = False

    def succeeded(self) -> None:
        self.decided = True
        self.upstream.record_success(time.monotonic() - self.started)

    def failed(self, error: str, *, down: bool = False) -> None:
        self.decided = True
        self.pool.record_failure(self.upstream, error, down=down)

    def close(self) -> None:
        self.upstream.end(self.probe)
