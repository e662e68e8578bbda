"""A real Prometheus scrapes a real Jarvis under a short load; the shipped rules and dashboard check out.

The session fixture installs the Debian `prometheus` package (prometheus +
promtool) when they are missing and apt-get can; otherwise the tests that need
them are skipped with the reason. Prometheus runs on 127.0.0.1 with a
temporary config and storage, a 1 s scrape interval, and the shipped
deploy/prometheus/alerts.yml as its rule file, so the PromQL rules are
evaluated against live Jarvis series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

DEPLOY = Path(__file__).parents[2] / "deploy"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "jarvis.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml"


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of prometheus and promtool, installing the Debian package first where they are missing."""
    def found() -> dict[str, str] | None:
        paths = {name: shutil.which(name) for name in ("prometheus", "promtool")}
        return paths if all(paths.values()) else None  # type: ignore[return-value]

    if found():
        return found()  # type: ignore[return-value]
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("prometheus/promtool are not installed and apt-get is not available to install them")
    if os.geteuid() != 0:
        pytest.skip("prometheus/promtool are not installed and installing the Debian package needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [[apt, "update"], [apt, "install", "-y", "--no-install-recommends", "prometheus"]]
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"could not install prometheus ({' '.join(step)}): {done.stderr[-500:]}")
    if not found():
        pytest.skip("the Debian package prometheus installed but prometheus/promtool are not on PATH")
    return found()  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERT_RULES)],
            "scrape_configs": [{"job_name": "jarvis", "static_configs": [{"targets": [target]}]}]}))
        self.log_path = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus did not become ready:\n{self.log_path.read_text()}")

    def query(self, promql: str) -> list[dict]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql: str, expected: float, timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.value(promql) == expected:
                return expected
            time.sleep(0.3)
        return self.value(promql)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def scraped(jarvis_server, prometheus_tools, tmp_path_factory):
    server = jarvis_server(JARVIS_TELEMETRY_ALERT_P95_LATENCY_S="0.01", JARVIS_TELEMETRY_ALERT_MIN_REQUESTS="1",
                           JARVIS_TELEMETRY_ALERT_WINDOW_S="4", JARVIS_TELEMETRY_ALERT_CHECK_INTERVAL_S="0.25",
                           JARVIS_LLAMA_N_THREADS="1")
    prometheus = Prometheus(prometheus_tools["prometheus"], tmp_path_factory.mktemp("prometheus"),
                            server.base_url.removeprefix("http://"))
    yield server, prometheus
    prometheus.stop()


def run_requests(server, n: int) -> list:
    """n requests, two at a time: half non-streaming completions, half streaming chat; their usages."""
    from openai import OpenAI

    client = OpenAI(base_url=server.v1, api_key="none")
    model = client.models.list().data[0].id

    def one(i: int):
        if i % 2 == 0:
            return client.completions.create(model=model, prompt=f"Item {i}: the", max_tokens=8).usage
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Say {i}."}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        return [c.usage for c in stream if c.usage][-1]

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.slow
def test_prometheus_scrapes_requests_latency_tokens_and_alerts(scraped):
    server, prom = scraped
    job = '{job="jarvis"}'
    usages = run_requests(server, 4)
    assert prom.wait_value(f'sum(jarvis_requests_total{job})', 4) == 4  # two scrapes apart: rate() has a slope
    usages += run_requests(server, 4)
    assert prom.wait_value('sum(jarvis_requests_total{job="jarvis",status="ok"})', 8) == 8

    by_operation = {r["metric"]["operation"]: float(r["value"][1])
                    for r in prom.query(f"sum by (operation) (jarvis_requests_total{job})")}
    assert by_operation == {"chat": 4.0, "text_completion": 4.0}
    series = prom.query(f"jarvis_request_duration_seconds_count{job}")
    assert [(s["metric"]["model"], s["metric"]["adapter"], s["value"][1]) for s in series] == \
        [("gemma-3-270m", "none", "8")]
    assert prom.value('sum(jarvis_request_duration_seconds_bucket{job="jarvis",le="+Inf"})') == 8
    p95 = prom.value(f"histogram_quantile(0.95, sum by (le) (rate(jarvis_request_duration_seconds_bucket{job}[1m])))")
    assert p95 is not None and 0 < p95 < 60
    assert prom.value(f"sum(jarvis_time_to_first_token_seconds_count{job})") == 8
    assert prom.value(f"sum(jarvis_completion_tokens_total{job})") == sum(u.completion_tokens for u in usages)
    assert prom.value(f"sum(jarvis_prompt_tokens_total{job})") == sum(u.prompt_tokens for u in usages)
    assert prom.value(f"jarvis_process_resident_memory_bytes{job}") > 50e6

    # The server-side alert (p95 latency over 10 ms) fired, Prometheus saw it and its rule turned it into an alert.
    assert prom.wait_value('max_over_time(jarvis_alert_active{job="jarvis",alert="p95_latency"}[2m])', 1) == 1
    assert prom.wait_value('max_over_time(ALERTS{alertname="JarvisServerAlert",alert="p95_latency"}[2m])', 1) == 1
    log = server.log()
    firing = re.search(r"alert p95_latency firing: .*", log)
    assert firing and "over the threshold 0.01s" in firing.group(0) and "slowest gen-" in firing.group(0), log
    assert "model=gemma-3-270m" in firing.group(0)
    # Recovery: no requests for longer than the 4 s window empties it and clears the alert. (It may have
    # recovered and fired again between the two bursts already: the last event is the one that counts.)
    def last_event() -> str | None:
        events = re.findall(r"alert p95_latency (firing|recovered)", server.log())
        return events[-1] if events else None

    deadline = time.monotonic() + 15
    while last_event() != "recovered" and time.monotonic() < deadline:
        time.sleep(0.25)
    assert last_event() == "recovered"
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'jarvis_alert_active{alert="p95_latency"} 0.0' in metrics
    assert prom.wait_value('jarvis_alert_active{job="jarvis",alert="p95_latency"}', 0) == 0

    groups = httpx.get(f"{prom.url}/api/v1/rules").json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules), rules


def test_alert_rules_pass_promtool(prometheus_tools):
    done = subprocess.run([prometheus_tools["promtool"], "check", "rules", str(ALERT_RULES)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def known_metric_series() -> set[str]:
    """Every series name Jarvis can export: the registry's families with their samples, plus live gauges."""
    from jarvis.plugins.telemetry.metrics import LIVE_METRICS, ServerMetrics

    metrics = ServerMetrics()
    metrics.record("m", None, "chat", "ok", latency_s=1.0, ttft_s=0.1, prompt_tokens=1, completion_tokens=2,
                   error_type="E")
    names = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    return names | set(LIVE_METRICS)


def test_dashboard_panels_query_existing_metrics_through_provisioned_datasources():
    dashboard = json.loads(DASHBOARD.read_text())
    provisioned = DATASOURCES.read_text()
    uids = dict(zip(re.findall(r"^\s+uid: (\S+)$", provisioned, re.M),
                    re.findall(r"^\s+type: (\S+)$", provisioned, re.M)))
    assert uids == {"prometheus": "prometheus", "tempo": "tempo"}
    known = known_metric_series()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "latency", "first token", "tokens/s", "errors", "gpu", "adapter", "trace"):
        assert topic in titles, topic
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            source = target["datasource"]
            assert uids.get(source["uid"]) == source["type"], (panel["title"], source)
        for target in panel["targets"]:
            if panel["datasource"]["type"] == "tempo":
                assert "gen_ai.operation.name" in target["query"]
                continue
            used = set(re.findall(r"\bjarvis_[a-z_]+", target["expr"]))
            assert used and used <= known, (panel["title"], used - known)
    rules_text = ALERT_RULES.read_text()
    assert set(re.findall(r"\bjarvis_[a-z_]+", rules_text)) <= known
