"""The vLLM engine beyond the shared API suite: LoRA at run time, a merged adapter, and start-up diagnosis.

Real vLLM (the CPU build in CI), the embedded model converted once, and a
LoRA trained in the session (conftest.trained_lora, whose greedy answers come
from PEFT offline).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"


def greedy(server, model: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)
    return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text


MERGED_TEST = "test_merged_adapter_serves_what_the_adapter_serves"


@pytest.fixture(scope="session", autouse=True)
def merged_server_start(request, tmp_path_factory) -> Iterator[Future | None]:
    """The merged-adapter server, started in the background as soon as this module begins, so its start (a minute
    or more) overlaps the session vLLM server's start or the first test. Its test comes second and stops it before
    the engine-kill test restarts an engine: never more than two vLLM engines at once, as before. Started only
    where its test is collected and vLLM is installed."""
    if importlib.util.find_spec("vllm") is None or not any(item.name == MERGED_TEST
                                                           for item in request.session.items):
        yield None
        return
    start_jarvis, trained_lora = request.getfixturevalue("start_jarvis"), request.getfixturevalue("trained_lora")
    adapter_root, vllm_env = request.getfixturevalue("adapter_root"), request.getfixturevalue("vllm_env")
    with ThreadPoolExecutor(1, thread_name_prefix="merged-vllm") as pool:
        future = pool.submit(start_jarvis, tmp_path_factory.mktemp("merged"), ready_within=600,
                             JARVIS_VLLM_MERGE_ADAPTER=str(trained_lora["path"]),
                             JARVIS_ADAPTER_ROOT=str(adapter_root), JARVIS_VLLM_ENABLE_LORA="false", **vllm_env)
        yield future
        try:
            future.result().stop()  # its test stops it; here in case that test did not get to run
        except Exception:
            pass


def test_adapter_loads_changes_the_answer_and_unloads(vllm_server, trained_lora):
    prompt = trained_lora["prompt"]
    base = greedy(vllm_server, MODEL, prompt)
    assert base == trained_lora["base_text"]  # vLLM's greedy answer is PEFT's/transformers'
    loaded = httpx.post(f"{vllm_server.v1}/load_lora_adapter",
                        json={"lora_name": "pirate", "lora_path": str(trained_lora["path"])}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    ids = [m["id"] for m in httpx.get(f"{vllm_server.v1}/models").json()["data"]]
    assert ids == [MODEL, "pirate"]
    adapted = greedy(vllm_server, "pirate", prompt)
    assert adapted != base
    assert adapted == trained_lora["adapter_text"]
    assert greedy(vllm_server, MODEL, prompt) == base  # the base is untouched while the adapter is loaded
    unloaded = httpx.post(f"{vllm_server.v1}/unload_lora_adapter", json={"lora_name": "pirate"}, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        greedy(vllm_server, "pirate", prompt)
    assert greedy(vllm_server, MODEL, prompt) == base


def test_merged_adapter_serves_what_the_adapter_serves(merged_server_start, trained_lora, vllm_installed):
    server = merged_server_start.result()  # JARVIS_VLLM_MERGE_ADAPTER=<the pirate adapter>, LoRA off
    try:
        assert server.health()["status"] == "ready", server.log()[-3000:]
        ids = [m["id"] for m in httpx.get(f"{server.v1}/models").json()["data"]]
        assert ids == ["pirate"]  # served under the adapter's name, as a LoRA-serving server would
        assert greedy(server, "pirate", trained_lora["prompt"]) == trained_lora["adapter_text"]
        engine = httpx.get(f"{server.v1}/engine").json()
        assert str(trained_lora["path"]) in str(engine)
    finally:
        server.stop()


def test_bad_configuration_stops_the_start_with_the_fix(jarvis_cli, vllm_installed):
    # the two commands are independent: run side by side (each spends its ~10 s importing vLLM for the plan)
    with ThreadPoolExecutor(2) as pool:
        serving = pool.submit(jarvis_cli, "serve", JARVIS_INFERENCE_ENGINE="vllm",
                              JARVIS_VLLM_TENSOR_PARALLEL_SIZE="2", JARVIS_VLLM_MAX_LORA_RANK="12",
                              JARVIS_VLLM_QUANTIZATION="fp8")
        doctoring = pool.submit(jarvis_cli, "doctor", "--engine", "vllm", JARVIS_VLLM_MAX_LORA_RANK="12")
        done, doctor = serving.result(), doctoring.result()
    assert done.returncode == 2, done.stderr
    for expected in ("JARVIS_VLLM_TENSOR_PARALLEL_SIZE", "JARVIS_VLLM_MAX_LORA_RANK", "JARVIS_VLLM_QUANTIZATION",
                     "fix:", "JARVIS_INFERENCE_ENGINE=hf"):
        assert expected in done.stderr
    assert doctor.returncode == 1 and "JARVIS_VLLM_MAX_LORA_RANK" in doctor.stderr
    assert "1, 8, 16, 32, 64" in doctor.stderr


def test_engine_process_killed_is_restarted_with_its_adapters(vllm_server, trained_lora):
    """SIGKILL vLLM's engine process: requests get 503 meanwhile, then the runtime restarts the engine."""
    import signal
    import time

    import psutil

    prompt = trained_lora["prompt"]
    loaded = httpx.post(f"{vllm_server.v1}/load_lora_adapter",
                        json={"lora_name": "pirate2", "lora_path": str(trained_lora["path"])}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    cores = [p for p in psutil.Process(vllm_server.process.pid).children(recursive=True)
             if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert cores, "no vLLM engine process found"
    for core in cores:
        core.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 600
    seen = set()
    while time.monotonic() < deadline:
        health = vllm_server.health()
        seen.add(health["status"])
        if health["status"] == "ready" and health["engine_restarts"] >= 1:
            break
        time.sleep(0.5)
    assert "restarting" in seen and health["engine_restarts"] == 1, (seen, health)
    assert greedy(vllm_server, MODEL, prompt) == trained_lora["base_text"]
    assert greedy(vllm_server, "pirate2", prompt) == trained_lora["adapter_text"]
    assert httpx.post(f"{vllm_server.v1}/unload_lora_adapter", json={"lora_name": "pirate2"}).status_code == 200
