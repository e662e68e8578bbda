"""The replica router: JARVIS_UPSTREAMS, several OpenAI-compatible servers behind one Jarvis.

The pool's choices and circuit transitions are checked on real `Upstream`
objects without a network; the rest runs three real llama.cpp Jarvis servers
on 127.0.0.1 with a router Jarvis in front, and kills and restarts them.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from jarvis.backends.upstream.pool import Upstream, UpstreamPool, parse_upstreams
from jarvis.errors import ConfigError, EngineUnavailable

MODEL = "gemma-3-270m"
LLAMA = {"JARVIS_INFERENCE_ENGINE": "llama_cpp", "JARVIS_MAX_MODEL_LEN": "512", "JARVIS_LLAMA_N_PARALLEL": "2",
         "JARVIS_LLAMA_N_THREADS": "1"}
COOLDOWN = 3.0


# --- the pool's logic, no network ------------------------------------------------------------------------

def pool_of(n: int, **kw) -> UpstreamPool:
    return UpstreamPool([Upstream(f"http://127.0.0.1:{9000 + i}/v1") for i in range(n)], **kw)


def test_least_outstanding_wins_and_ties_go_round_robin():
    pool = pool_of(3)
    a, b, c = pool.upstreams
    assert [pool.attempt().upstream for _ in range(3)] == [a, b, c]  # all tied: round-robin
    a.outstanding = b.outstanding = c.outstanding = 0
    b.outstanding = 2
    c.outstanding = 1
    assert pool.choose() is a
    a.outstanding = 5
    assert pool.choose() is c
    c.outstanding = 2  # b and c tie at 2: the turn moves on past the last chosen
    assert [pool.choose(), pool.choose()] == [b, c]


def test_choice_skips_down_tried_and_adapterless_upstreams():
    pool = pool_of(3)
    a, b, c = pool.upstreams
    b.up = False
    assert {pool.choose() for _ in range(4)} == {a, c}
    assert pool.choose(exclude=[a]) is c
    assert pool.choose(exclude=[a, c]) is b  # no upstream up is left: a down one is worth a try
    c.adapters.add("pirate")
    assert pool.choose("pirate") is c
    c.serves_model = False
    with pytest.raises(EngineUnavailable) as info:
        pool.choose("pirate")
    message = info.value.message
    assert info.value.status_code == 503 and "does not hold adapter 'pirate'" in message
    assert all(u.url in message for u in pool.upstreams)


class Clock:
    """The pool's `time`, moved by hand: a circuit's cool-down passes when the test says, not when a busy
    machine happens to let it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_circuit_opens_half_opens_for_one_probe_and_closes(monkeypatch):
    from jarvis.backends.upstream import pool as pool_module

    clock = Clock()
    monkeypatch.setattr(pool_module, "time", clock)
    pool = pool_of(2, failure_threshold=2, cooldown=0.2)
    a, b = pool.upstreams
    pool.record_failure(a, "boom")
    assert a.circuit() == "closed"
    pool.record_failure(a, "boom")
    assert a.circuit() == "open"
    assert {pool.choose() for _ in range(3)} == {b}
    clock.now += 0.25
    assert a.circuit() == "half_open"
    probe = pool.attempt(exclude=[b])
    assert probe.upstream is a and probe.probe
    with pytest.raises(EngineUnavailable) as info:  # one probe at a time
        pool.choose(exclude=[b])
    assert "probe" in info.value.message
    probe.failed("still broken")
    probe.close()
    assert a.circuit() == "open"  # a failed probe opens it again, for a whole cool-down
    clock.now += 0.25
    probe = pool.attempt(exclude=[b])
    probe.close()  # the client went away: the probe decided nothing
    assert a.circuit() == "half_open"
    probe = pool.attempt(exclude=[b])
    probe.succeeded()
    probe.close()
    assert a.circuit() == "closed" and a.consecutive_failures == 0 and a.latency_ms is not None


def test_upstream_list_parsing():
    assert parse_upstreams("http://a:1/v1/, k@x@https://b:2/v1", "default") == [
        ("http://a:1/v1", "default"), ("https://b:2/v1", "k@x")]
    for bad in ("", "http://a:1/v1,,http://b:1/v1", "a:1/v1", "http://a:1/v1,http://a:1/v1"):
        with pytest.raises(ConfigError) as info:
            parse_upstreams(bad, None)
        assert info.value.setting == "JARVIS_UPSTREAMS"
    with pytest.raises(ConfigError) as info:
        parse_upstreams("secret@http://a:1/v1,ftp://b", None)
    assert "secret" not in str(info.value)  # keys never reach messages


def test_both_url_settings_or_a_malformed_list_stop_serve(jarvis_cli):
    both = jarvis_cli("serve", JARVIS_INFERENCE_ENGINE="openai", JARVIS_UPSTREAM_URL="http://127.0.0.1:1/v1",
                      JARVIS_UPSTREAMS="http://127.0.0.1:2/v1,http://127.0.0.1:3/v1")
    assert both.returncode == 2
    assert "JARVIS_UPSTREAMS" in both.stderr and "exclusive" in both.stderr and "fix:" in both.stderr
    malformed = jarvis_cli("serve", JARVIS_INFERENCE_ENGINE="openai",
                           JARVIS_UPSTREAMS="http://127.0.0.1:2/v1;127.0.0.1:3/v1")
    assert malformed.returncode == 2
    assert "JARVIS_UPSTREAMS" in malformed.stderr and "fix:" in malformed.stderr


# --- three real upstreams and a router in front ------------------------------------------------------------

ROUTER = {"JARVIS_INFERENCE_ENGINE": "openai", "JARVIS_UPSTREAM_HEALTH_INTERVAL": "0.5",
          "JARVIS_UPSTREAM_HEALTH_TIMEOUT": "5", "JARVIS_UPSTREAM_CONNECT_TIMEOUT": "2",
          "JARVIS_UPSTREAM_FAILURE_THRESHOLD": "3", "JARVIS_UPSTREAM_COOLDOWN": str(COOLDOWN)}


class Cluster:
    def __init__(self, start_server, tmp_path_factory, adapter_root) -> None:
        self.start_server, self.factory, self.adapter_root = start_server, tmp_path_factory, adapter_root
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            self.upstreams = list(pool.map(lambda i: self.start_upstream(), range(3)))
        self.router = start_server(tmp_path_factory.mktemp("router"), JARVIS_ADAPTER_ROOT=str(adapter_root),
                                   JARVIS_UPSTREAMS=",".join(u.v1 for u in self.upstreams), **ROUTER)
        assert self.router.health()["status"] == "ready", self.router.log()

    def start_upstream(self, port: int | None = None):
        # a fresh state folder: a restarted upstream remembers no adapter, the router has to restore them
        return self.start_server(self.factory.mktemp("upstream"), port=port,
                                 JARVIS_ADAPTER_ROOT=str(self.adapter_root), **LLAMA)

    def upstream_metrics(self) -> dict[str, dict]:
        return {u["url"]: u for u in httpx.get(f"{self.router.v1}/engine", timeout=10).json()["upstreams"]}

    def wait_for(self, url: str, what, within: float = 60) -> dict:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            metrics = self.upstream_metrics()[url]
            if what(metrics):
                return metrics
            time.sleep(0.1)
        raise AssertionError(f"{url} never got there: {self.upstream_metrics()[url]}\n{self.router.log()[-3000:]}")

    def stop(self) -> None:
        for server in [self.router, *self.upstreams]:
            server.stop()


@pytest.fixture(scope="module")
def cluster(start_jarvis, tmp_path_factory, adapter_root):
    cluster = Cluster(start_jarvis, tmp_path_factory, adapter_root)
    yield cluster
    cluster.stop()


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def outcome(server, i: int, stream: bool, model: str = MODEL) -> str:
    """'ok' for a complete answer, 'error <status>' for a proper OpenAI error, anything else is a bug."""
    client = client_of(server)
    try:
        if stream:
            finish = None
            for chunk in client.completions.create(model=model, prompt=f"Story {i}:", max_tokens=8, stream=True):
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        else:
            finish = client.completions.create(model=model, prompt=f"Story {i}:", max_tokens=8).choices[0] \
                .finish_reason
        return "ok" if finish in ("stop", "length") else f"incomplete {finish}"
    except openai.APIStatusError as exc:
        return f"error {exc.status_code}"
    except openai.APIError as exc:  # an error event after the stream began
        return f"error in stream: {exc.message[:80]}"


def run_concurrently(server, n: int, workers: int = 6, model: str = MODEL) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: outcome(server, i, stream=i % 2 == 0, model=model), range(n)))


@pytest.mark.slow
def test_requests_spread_across_all_upstreams(cluster):
    before = {url: m["requests"] for url, m in cluster.upstream_metrics().items()}
    assert run_concurrently(cluster.router, 12) == ["ok"] * 12
    metrics = cluster.upstream_metrics()
    served = {url: m["requests"] - before[url] for url, m in metrics.items()}
    assert len(served) == 3 and all(n >= 2 for n in served.values()), served
    for m in metrics.values():
        assert m["up"] and m["circuit"] == "closed" and m["outstanding"] == 0 and m["latency_ms"] > 0


@pytest.mark.slow
def test_adapters_are_placed_on_every_upstream(cluster, trained_lora):
    router = cluster.router
    loaded = httpx.post(f"{router.v1}/load_lora_adapter",
                        json={"lora_name": "pirate", "lora_path": str(trained_lora["path"])}, timeout=300)
    assert loaded.status_code == 200, loaded.text
    for upstream in cluster.upstreams:
        assert "pirate" in [m["id"] for m in httpx.get(f"{upstream.v1}/models").json()["data"]]
    assert all(m["adapters"] == ["pirate"] for m in cluster.upstream_metrics().values())
    prompt = trained_lora["prompt"]
    answers = {client_of(router).completions.create(model="pirate", prompt=prompt, max_tokens=8, temperature=0)
               .choices[0].text for _ in range(3)}
    direct = client_of(cluster.upstreams[0]).completions.create(model="pirate", prompt=prompt, max_tokens=8,
                                                                temperature=0).choices[0].text
    assert answers == {direct}
    assert httpx.post(f"{router.v1}/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
    for upstream in cluster.upstreams:
        assert "pirate" not in [m["id"] for m in httpx.get(f"{upstream.v1}/models").json()["data"]]
    assert all(m["adapters"] == [] for m in cluster.upstream_metrics().values())


@pytest.mark.slow
def test_kill_one_upstream_mid_load_then_it_rejoins(cluster, trained_lora):
    router = cluster.router
    assert httpx.post(f"{router.v1}/load_lora_adapter", timeout=300,
                      json={"lora_name": "pirate", "lora_path": str(trained_lora["path"])}).status_code == 200
    victim = cluster.upstreams[2]
    port = int(victim.base_url.rsplit(":", 1)[1])
    with concurrent.futures.ThreadPoolExecutor(1) as background:
        load = background.submit(run_concurrently, router, 36)
        cluster.wait_for(victim.v1, lambda m: m["outstanding"] > 0)
        victim.process.kill()  # a crash: no goodbye to the streams in flight
        victim.process.wait()
        during = load.result()
    assert all(r == "ok" or r.startswith("error") for r in during), during
    failed_during = [r for r in during if r != "ok"]

    open_ = cluster.wait_for(victim.v1, lambda m: m["circuit"] == "open", within=20)
    assert not open_["up"] and open_["consecutive_failures"] >= 3 and open_["last_error"]
    requests_then = open_["requests"]
    assert run_concurrently(router, 12) == ["ok"] * 12  # after the failover window: no error
    assert cluster.upstream_metrics()[victim.v1]["requests"] == requests_then  # nothing went to the dead one

    restarted = cluster.start_upstream(port=port)  # the same address, a fresh state: no adapter
    cluster.upstreams[2] = restarted
    back_at = time.monotonic()
    # The health check marks it up at once (base requests may go there), then loads the adapters it missed;
    # adapter requests go only to upstreams that hold the adapter.
    half_open = cluster.wait_for(victim.v1, lambda m: m["up"] and m["circuit"] == "half_open"
                                 and m["adapters"] == ["pirate"], within=COOLDOWN + 30)
    assert half_open["adapters"] == ["pirate"]  # the router loaded what it missed
    assert "pirate" in [m["id"] for m in httpx.get(f"{restarted.v1}/models").json()["data"]]
    deadline = time.monotonic() + 30
    while cluster.upstream_metrics()[victim.v1]["circuit"] != "closed" and time.monotonic() < deadline:
        assert run_concurrently(router, 6) == ["ok"] * 6  # one of them is the probe
    rejoined = cluster.upstream_metrics()[victim.v1]
    assert rejoined["circuit"] == "closed" and rejoined["requests"] > requests_then, rejoined
    assert run_concurrently(router, 6, model="pirate") == ["ok"] * 6
    print(f"\nfailover: {len(failed_during)} of {len(during)} requests failed while the upstream died "
          f"({failed_during}); rejoined {time.monotonic() - back_at:.1f} s after its restart answered "
          f"(cool-down {COOLDOWN} s)")
    assert httpx.post(f"{router.v1}/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
    for upstream in cluster.upstreams:
        assert "pirate" not in [m["id"] for m in httpx.get(f"{upstream.v1}/models").json()["data"]]


@pytest.mark.slow
def test_upstreams_serving_different_models_are_named(cluster):
    other = cluster.start_server(cluster.factory.mktemp("other"), JARVIS_SERVED_MODEL_NAME="another-model", **LLAMA)
    try:
        router = cluster.start_server(cluster.factory.mktemp("mixed"), JARVIS_INFERENCE_ENGINE="openai",
                                      JARVIS_UPSTREAMS=f"{cluster.upstreams[0].v1},{other.v1}",
                                      JARVIS_ENGINE_START_RETRY="true")
        health = router.health()
        router.stop()
    finally:
        other.stop()
    assert health["status"] == "failed"
    error = health["error"]
    assert "do not serve the same model" in error
    # (the first upstream may still list adapters an earlier test loaded: only its base model is checked)
    assert f"{cluster.upstreams[0].v1} serves ['{MODEL}'" in error and f"{other.v1} serves ['another-model'" in error
