"""Admission (slots + bounded queue) and per-client rate limits, on the real asyncio machinery."""

from __future__ import annotations

import asyncio

import pytest

from jarvis.errors import RateLimited
from jarvis.limits import Admission, ClientRateLimiter, client_id


def test_admission_runs_at_most_n_and_rejects_past_the_queue():
    async def scenario():
        admission = Admission(max_concurrent=2, max_queue=1, retry_after=3)
        release = asyncio.Event()
        peak = 0

        async def work():
            nonlocal peak
            async with admission.slot():
                peak = max(peak, admission.running)
                await release.wait()

        tasks = [asyncio.create_task(work()) for _ in range(3)]  # two run, one waits
        await asyncio.sleep(0.01)
        assert (admission.running, admission.waiting) == (2, 1)
        with pytest.raises(RateLimited) as info:
            admission.check()
        assert info.value.status_code == 429 and info.value.headers == {"Retry-After": "3"}
        assert "JARVIS_MAX_CONCURRENT=2" in info.value.message
        release.set()
        await asyncio.gather(*tasks)
        assert peak == 2 and (admission.running, admission.waiting) == (0, 0)
        admission.check()  # room again

    asyncio.run(scenario())


def test_unlimited_admission_never_rejects():
    admission = Admission(max_concurrent=None, max_queue=0)
    admission.check()


def test_requests_per_minute_per_client():
    limiter = ClientRateLimiter(requests_per_minute=2, tokens_per_minute=None)
    limiter.admit("a")
    limiter.admit("a")
    with pytest.raises(RateLimited) as info:
        limiter.admit("a")
    assert 1 <= int(info.value.headers["Retry-After"]) <= 60
    limiter.admit("b")  # another client has its own minute


def test_tokens_per_minute_per_client():
    limiter = ClientRateLimiter(requests_per_minute=None, tokens_per_minute=100)
    limiter.admit("a")
    limiter.record("a", 60)
    limiter.admit("a")
    limiter.record("a", 50)
    with pytest.raises(RateLimited) as info:
        limiter.admit("a")
    assert "110 of 100 tokens" in info.value.message


def test_client_id_never_holds_the_key():
    ident = client_id("sk-very-secret", "127.0.0.1")
    assert "secret" not in ident and ident.startswith("key-")
    assert client_id("sk-very-secret", None) == ident
    assert client_id(None, "10.1.2.3") == "addr-10.1.2.3"


def test_a_full_server_sheds_generation_requests_at_the_door_in_their_apis_shape():
    """While every slot is busy and the queue is full, POSTs to the generation routes are answered 429 before
    the app runs (no body read, no routing); everything else reaches the app."""
    import asyncio
    import json

    from jarvis.limits import Admission
    from jarvis.shedding import shed_when_full

    admission = Admission(max_concurrent=1, max_queue=0, retry_after=2.0)
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    shed = shed_when_full(admission)(app)

    def call(method: str, path: str) -> list[dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        asyncio.run(shed({"type": "http", "method": method, "path": path}, None, send))
        return sent

    assert call("POST", "/v1/chat/completions") == [] and reached == ["/v1/chat/completions"]  # not full yet
    admission.running = 1
    start, body = call("POST", "/v1/chat/completions")
    assert start["status"] == 429 and (b"retry-after", b"2") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "server_overloaded"
    start, body = call("POST", "/v1/messages")
    anthropic = json.loads(body["body"])
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "rate_limit_error"
    assert call("GET", "/v1/models") == [] and call("POST", "/v1/load_lora_adapter") == []
    assert reached == ["/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter"]
