"""Watching the upstreams of a pool: the start, the health checks, and where the adapters are.

`UpstreamMonitor` waits at start until one upstream answers and checks that
every answering upstream serves the same model; then it runs the active
health checks (GET /models every JARVIS_UPSTREAM_HEALTH_INTERVAL seconds)
that mark upstreams down and up again; and it places adapters: a load goes to
every upstream that is up, an unload everywhere, and an upstream found
missing an adapter (down at the load, or restarted without it) gets it loaded
again by its health check, while one that refuses it is left out for that
adapter until it rejoins. An upstream's error answer becomes the client's in
`errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from jarvis.backends.upstream.errors import unreachable, upstream_error
from jarvis.backends.upstream.pool import Upstream, UpstreamPool
from jarvis.errors import APIError, ConfigError

log = logging.getLogger("jarvis.backends.upstream.monitor")

#: Seconds an idle upstream connection is kept: below uvicorn's 5 s idle timeout (`vllm serve`, llama.cpp's
#: Python server, an older Jarvis), so Jarvis never sends a request on a connection the upstream is closing.
UPSTREAM_KEEPALIVE_EXPIRY = 4.0


class UpstreamMonitor:
    """Start, health checks and adapter placement for the upstreams of one pool."""

    def __init__(self, pool: UpstreamPool, health_timeout: float = 5.0) -> None:
        self.pool = pool
        self.upstreams = pool.upstreams
        self.health_timeout = health_timeout
        #: The pool's model id, set at start.
        self.model: str | None = None
        #: Adapters served through the pool: name → path, as the upstreams were asked to load them.
        self.adapters: dict[str, str] = {}
        #: Adapters unloaded while some upstream could not be told: unloaded there when it answers again.
        self.unloaded: set[str] = set()
        self.adapter_lock = asyncio.Lock()
        self._checks: asyncio.Task | None = None

    # --- start: the first upstream that answers makes the pool ready -------------------------------

    def open(self, timeout: float, connect_timeout: float) -> None:
        """Two connection pools per upstream: aiohttp's for the requests (its client costs about a sixth of
        httpx's CPU per request, which is most of what a proxied request costs), httpx's for the checks
        and adapter calls. Idle connections are dropped before the upstream's own idle timeout could close
        one under a request (`UPSTREAM_KEEPALIVE_EXPIRY`). Called on the event loop."""
        import aiohttp

        for u in self.upstreams:
            headers = {"Authorization": f"Bearer {u.api_key}"} if u.api_key else {}
            u.client = httpx.AsyncClient(base_url=u.url, headers=headers,
                                         timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=256,
                                                             keepalive_expiry=UPSTREAM_KEEPALIVE_EXPIRY))
            u.session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                                               sock_read=timeout),
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_EXPIRY))

    async def close(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
        for u in self.upstreams:
            if u.client is not None:
                await u.client.aclose()
            if u.session is not None:
                await u.session.close()

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
                results = await asyncio.gather(*(self.check(u) for u in self.upstreams), return_exceptions=True)
                for u, result in zip(self.upstreams, results):
                    if isinstance(result, Exception):
                        log.error("health check of %s failed: %s: %s", u.url, type(result).__name__, result)

        self._checks = asyncio.get_running_loop().create_task(loop(), name="upstream-health-checks")

    async def check(self, u: Upstream) -> bool:
        """GET /models: up, serving the pool's model, holding the pool's adapters (missing ones are loaded)."""
        cards, problem, _ = await self._models_of(u)
        if cards is None:
            if u.up:
                log.warning("upstream %s is down: %s", u.url, problem)
            self.pool.record_failure(u, f"health check: {problem}", down=True)
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
                raise self.pool.unavailable()
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
