"""Serving limits: how many generations run at once, how many may wait, and how much one client may ask.

`Admission` lets `max_concurrent` generations run and up to `max_queue` more
wait for a slot; an HTTP request that finds both full gets a 429 with
`Retry-After` at once instead of piling up (work that is already accepted,
such as batch lines, only waits). `ClientRateLimiter` keeps a one-minute
sliding window of requests and tokens per client (an API key's fingerprint,
or the peer address when the server has no keys).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from jarvis.errors import RateLimited


class Admission:
    def __init__(self, max_concurrent: int | None, max_queue: int, retry_after: float = 1.0) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.running = 0
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    @property
    def full(self) -> bool:
        """Every slot is busy and the queue is full: a new request would be refused."""
        return (self.max_concurrent is not None and self.running >= self.max_concurrent
                and self.waiting >= self.max_queue)

    def overloaded(self) -> RateLimited:
        return RateLimited(f"The server is at capacity: {self.running} generations running and {self.waiting} "
                           f"waiting (JARVIS_MAX_CONCURRENT={self.max_concurrent}, JARVIS_MAX_QUEUE="
                           f"{self.max_queue}). Retry after the Retry-After delay.", self.retry_after,
                           code="server_overloaded")

    def check(self) -> None:
        """Raise 429 when every slot is busy and the queue is full."""
        if self.full:
            raise self.overloaded()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `max_concurrent` slots while generating (waiting for one if needed)."""
        if self.max_concurrent is None:
            yield
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


def client_id(api_key: str | None, peer: str | None) -> str:
    """A client's identity that is safe to keep and log: a key's fingerprint, never the key."""
    if api_key:
        return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:12]
    return f"addr-{peer or 'unknown'}"


class ClientRateLimiter:
    """Requests and tokens per minute per client, over a sliding one-minute window."""

    WINDOW = 60.0

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _trim(self, client: str, now: float) -> None:
        horizon = now - self.WINDOW
        requests = self._requests.setdefault(client, deque())
        while requests and requests[0] < horizon:
            requests.popleft()
        tokens = self._tokens.setdefault(client, deque())
        while tokens and tokens[0][0] < horizon:
            tokens.popleft()

    def admit(self, client: str) -> None:
        """Count one request for `client`, or raise 429 if its minute is used up."""
        if not self.active:
            return
        now = time.monotonic()
        self._trim(client, now)
        requests, tokens = self._requests[client], self._tokens[client]
        if self.rpm and len(requests) >= self.rpm:
            raise RateLimited(f"Rate limit reached: {self.rpm} requests per minute (JARVIS_RATE_LIMIT_RPM).",
                              requests[0] + self.WINDOW - now, code="rate_limit_exceeded")
        used = sum(n for _, n in tokens)
        if self.tpm and used >= self.tpm:
            raise RateLimited(f"Rate limit reached: {used} of {self.tpm} tokens per minute used "
                              f"(JARVIS_RATE_LIMIT_TPM).", tokens[0][0] + self.WINDOW - now, code="rate_limit_exceeded")
        requests.append(now)

    def record(self, client: str | None, tokens: int) -> None:
        """Charge `tokens` (prompt + completion) to `client`."""
        if client is None or not self.tpm or tokens <= 0:
            return
        self._tokens.setdefault(client, deque()).append((time.monotonic(), tokens))
