"""The replica pool behind the upstream engine: which OpenAI-compatible server takes the next request.

`UpstreamPool` holds one `Upstream` per base URL (one for JARVIS_UPSTREAM_URL,
several for JARVIS_UPSTREAMS) and decides, per request, where it goes:

- balancing: the eligible upstream with the fewest outstanding requests; ties
  go round-robin;
- health: an active check (GET /models every JARVIS_UPSTREAM_HEALTH_INTERVAL
  seconds) marks an upstream up or down; a connection error on a request
  marks it down at once (passive); a down upstream rejoins when a check passes;
- circuit breaking: JARVIS_UPSTREAM_FAILURE_THRESHOLD consecutive failures
  (requests or checks) open the circuit for JARVIS_UPSTREAM_COOLDOWN seconds;
  then it is half-open: one probe request decides between closed and open again;
- adapters: the pool remembers which upstream holds which adapter; a request for
  an adapter goes only to upstreams holding it, and an upstream found missing
  one (a restart, a rejoin) gets it loaded again by the health check.

The HTTP calls of a generation live in the engine (backends/openai_upstream.py);
this module only keeps score and chooses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from jarvis.errors import APIError, ConfigError, EngineUnavailable

log = logging.getLogger("jarvis.backends.upstream_pool")

Circuit = Literal["closed", "open", "half_open"]

_ENTRY = re.compile(r"^(?:(?P<key>\S+?)@)?(?P<url>https?://[\w.\-\[\]:]+(?:/[\w.\-~/%]*)?)$")


def upstream_error(response_status: int, body: bytes | str, url: str) -> APIError:
    """The upstream's error, keeping its message; statuses that are Jarvis's own problem become 502."""
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        error, message = {}, None
    message = message or (body.decode(errors="replace") if isinstance(body, bytes) else str(body))[:500]
    if response_status in (401, 403):
        return APIError(f"The upstream {url} refused Jarvis's credentials ({response_status}): {message}. "
                        f"Set JARVIS_UPSTREAM_API_KEY.", status_code=502, error_type="upstream_error",
                        code="upstream_auth")
    if response_status >= 500:
        return APIError(f"The upstream {url} failed ({response_status}): {message}", status_code=502,
                        error_type="upstream_error", code="upstream_error")
    return APIError(message, status_code=response_status, param=error.get("param") if isinstance(error, dict) else None,
                    code=error.get("code") if isinstance(error, dict) else None,
                    error_type=(error.get("type") if isinstance(error, dict) else None) or "invalid_request_error")


def unreachable(url: str, exc: Exception) -> EngineUnavailable:
    return EngineUnavailable(f"The upstream {url} is unreachable ({type(exc).__name__}: {exc}).",
                             code="upstream_unreachable")


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
    client: httpx.AsyncClient | None = None
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
            log.warning("upstream %s: circuit open for %.1f s after %d consecutive failures (%s)", self.url,
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
        """One word and its reason, for the 503 message."""
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
                 cooldown: float = 10.0, health_timeout: float = 5.0) -> None:
        self.upstreams = upstreams
        self.max_attempts = max_attempts
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._turn = 0  # round-robin among the least loaded
        #: Adapters served through the pool: name → path, as the upstreams were asked to load them.
        self.adapters: dict[str, str] = {}
        #: Adapters unloaded while some upstream could not be told: unloaded there when it rejoins.
        self.unloaded: set[str] = set()
        self.adapter_lock = asyncio.Lock()
        self.health_timeout = health_timeout
        self.model: str | None = None
        self._checks: asyncio.Task | None = None

    def attempt(self, adapter: str | None = None, exclude: list[Upstream] | tuple = ()) -> "Attempt":
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

    # --- start: the first upstream that answers makes the pool ready -------------------------------

    def open(self, timeout: float, connect_timeout: float) -> None:
        for u in self.upstreams:
            headers = {"Authorization": f"Bearer {u.api_key}"} if u.api_key else {}
            u.client = httpx.AsyncClient(base_url=u.url, headers=headers,
                                         timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    async def close(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
        for u in self.upstreams:
            if u.client is not None:
                await u.client.aclose()

    async def _models_of(self, u: Upstream) -> tuple[list[dict[str, Any]] | None, str, int]:
        """The upstream's /models cards, or None with the problem (and the HTTP status, 0 when unreachable)."""
        try:
            response = await u.client.get("/models", timeout=self.health_timeout)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}", 0
        if response.status_code != 200:
            return None, f"GET /models answered {response.status_code}: {response.text[:200]}", response.status_code
        try:
            return list(response.json().get("data") or []), "", 200
        except (ValueError, AttributeError):
            return None, "GET /models answered no JSON model list", 200

    async def wait_for_first(self, model: str | None, start_timeout: float, url_setting: str,
                             key_set: bool) -> dict[str, Any]:
        """Wait until at least one upstream answers; return the card of the pool's model (JARVIS_UPSTREAM_MODEL,
        else the first one the first answering upstream lists). Every answering upstream must serve it."""
        deadline = time.monotonic() + start_timeout
        while True:
            answers = await asyncio.gather(*(self._models_of(u) for u in self.upstreams))
            answered = [(u, cards) for u, (cards, _, _) in zip(self.upstreams, answers) if cards is not None]
            if answered:
                break
            problems = "; ".join(f"{u.url}: {problem}" for u, (_, problem, _) in zip(self.upstreams, answers))
            refused = [status in (401, 403) for _, _, status in answers]
            if all(refused) or (any(refused) and time.monotonic() >= deadline):
                raise ConfigError("JARVIS_UPSTREAM_API_KEY", "***" if key_set else None,
                                  f"the upstream refused the key ({problems})", "set the upstream's key")
            if time.monotonic() >= deadline:
                raise ConfigError(url_setting, ", ".join(u.url for u in self.upstreams),
                                  f"no upstream answered ({problems})",
                                  "start the upstream servers first, check the URLs (each ends in /v1), or raise "
                                  "JARVIS_UPSTREAM_START_TIMEOUT")
            await asyncio.sleep(0.5)
        served = {u.url: [c.get("id") for c in cards] for u, cards in answered}
        chosen = model or (next(iter(served.values())) or [None])[0]
        differ = {url: ids for url, ids in served.items() if chosen not in ids}
        if differ or chosen is None:
            listing = "; ".join(f"{url} serves {ids or 'no model'}" for url, ids in served.items())
            if model or len(self.upstreams) == 1:
                raise ConfigError("JARVIS_UPSTREAM_MODEL", model, f"not every upstream serves it ({listing})",
                                  "set JARVIS_UPSTREAM_MODEL to a model id every upstream serves")
            raise ConfigError(url_setting, ", ".join(u.url for u in self.upstreams),
                              f"the upstreams do not serve the same model ({listing})",
                              "serve the same model on every upstream, or set JARVIS_UPSTREAM_MODEL to one that all "
                              "of them serve")
        self.model = chosen
        for u, (cards, problem, _) in zip(self.upstreams, answers):
            u.up = cards is not None
            if cards is None:
                u.last_error = f"not answering at start: {problem}"
                log.warning("upstream %s is not answering yet (%s); it joins when its health check passes",
                            u.url, problem)
        return next(c for c in answered[0][1] if c.get("id") == chosen)

    # --- active health checks ------------------------------------------------------------------

    def start_checks(self, interval: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                await asyncio.gather(*(self.check(u) for u in self.upstreams), return_exceptions=True)

        self._checks = asyncio.get_running_loop().create_task(loop(), name="upstream-health-checks")

    async def check(self, u: Upstream) -> bool:
        """GET /models: up, serving the pool's model, holding the pool's adapters (missing ones are loaded)."""
        cards, problem, _ = await self._models_of(u)
        if cards is None:
            if u.up:
                log.warning("upstream %s is down: %s", u.url, problem)
            self.record_failure(u, f"health check: {problem}", down=True)
            return False
        ids = {c.get("id") for c in cards}
        if self.model not in ids:
            if u.serves_model:
                log.error("upstream %s serves %s, not %s: it gets no requests", u.url, sorted(map(str, ids)),
                          self.model)
            u.serves_model, u.last_error = False, f"serves {sorted(map(str, ids))}, not {self.model}"
            return False
        u.serves_model = True
        if not u.up:
            log.warning("upstream %s is back (circuit %s)", u.url, u.circuit())
            u.up = True
            u.refused.clear()  # a restarted upstream may accept what it refused before
        held = ids & set(self.adapters)
        if held != u.adapters or set(self.adapters) - held - set(u.refused) or ids & self.unloaded:
            await self.reconcile_adapters(u)
        return True

    # --- adapters: placed on every upstream that takes them -----------------------------------------

    async def _adapter_call(self, u: Upstream, path: str, body: dict[str, Any]) -> None:
        try:
            response = await u.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise unreachable(u.url, exc) from None
        if response.status_code in (404, 405) and "adapter_not_found" not in response.text:
            raise NotImplementedError(f"the upstream {u.url} has no {path} endpoint (for vLLM, start it with "
                                      f"--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.content, u.url)

    async def _load_on(self, u: Upstream, name: str, path: str) -> None:
        try:
            await self._adapter_call(u, "/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except APIError as exc:
            if not (exc.status_code == 400 and "already" in exc.message):  # it holds it already: fine
                raise
        u.adapters.add(name)
        u.refused.pop(name, None)

    async def _unload_on(self, u: Upstream, name: str) -> None:
        try:
            await self._adapter_call(u, "/unload_lora_adapter", {"lora_name": name})
        except APIError as exc:
            if exc.status_code != 404:
                raise
        u.adapters.discard(name)

    async def reconcile_adapters(self, u: Upstream) -> None:
        async with self.adapter_lock:
            cards, _, _ = await self._models_of(u)
            if cards is None:
                return
            ids = {c.get("id") for c in cards}
            u.adapters = ids & set(self.adapters)
            for name in ids & self.unloaded:
                try:
                    await self._unload_on(u, name)
                    log.info("upstream %s: adapter %s unloaded (it was unloaded while the upstream was away)",
                             u.url, name)
                except Exception as exc:
                    log.warning("upstream %s: adapter %s could not be unloaded: %s", u.url, name, exc)
            for name, path in self.adapters.items():
                if name in u.adapters or name in u.refused:
                    continue
                try:
                    await self._load_on(u, name, path)
                    log.info("upstream %s: adapter %s loaded again", u.url, name)
                except Exception as exc:
                    u.refused[name] = f"{type(exc).__name__}: {exc}"
                    log.error("upstream %s refused adapter %s (%s): requests for it go elsewhere", u.url, name, exc)

    async def load_adapter(self, name: str, path: str) -> None:
        """Load on every upstream that is up; succeeds when at least one takes it (the others are left out
        for this adapter, and told again when they rejoin)."""
        async with self.adapter_lock:
            targets = [u for u in self.upstreams if u.up and u.serves_model and u.circuit() != "open"]
            if not targets:
                raise self.unavailable()
            results = await asyncio.gather(*(self._load_on(u, name, path) for u in targets), return_exceptions=True)
            errors = [(u, r) for u, r in zip(targets, results) if isinstance(r, BaseException)]
            if len(errors) == len(targets):
                raise errors[0][1]
            for u, error in errors:
                u.refused[name] = f"{type(error).__name__}: {error}"
                log.error("upstream %s refused adapter %s (%s): requests for it go elsewhere", u.url, name, error)
            self.adapters[name] = path
            self.unloaded.discard(name)

    async def unload_adapter(self, name: str) -> None:
        """Unload everywhere; an upstream that cannot be told now is told when it answers again."""
        async with self.adapter_lock:
            results = await asyncio.gather(*(self._unload_on(u, name) for u in self.upstreams),
                                           return_exceptions=True)
            failed = [(u, r) for u, r in zip(self.upstreams, results) if isinstance(r, BaseException)]
            if len(failed) == len(self.upstreams):
                raise failed[0][1]
            self.adapters.pop(name, None)
            for u in self.upstreams:
                u.refused.pop(name, None)
            for u, error in failed:
                self.unloaded.add(name)
                log.warning("upstream %s: adapter %s not unloaded now (%s); it will be when it answers",
                            u.url, name, error)

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
