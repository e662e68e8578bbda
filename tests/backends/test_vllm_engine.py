"""The vLLM engine beyond the shared API suite: LoRA at run time, a merged adapter, and start-up diagnosis.

Real vLLM (the CPU build in CI), the embedded model converted once, and a
LoRA trained in the session (conftest.trained_lora, whose greedy answers come
from PEFT offline).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"


def greedy(server, model: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)
    return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text


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


def test_a_merged_adapter_is_served_under_its_name(trained_lora, adapter_root, vllm_installed, monkeypatch):
    """JARVIS_VLLM_MERGE_ADAPTER: the folder the engine hands vLLM is the base with the adapter merged in, and
    the model is served under the adapter's name. Checked in process, without a second vLLM start (a minute and
    a half on two cores): the merged folder's greedy answer through transformers is the adapter's, and the test
    above shows vLLM's greedy answers are transformers' on this model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jarvis.backends.model_tools.lora_merge import MARKER
    from jarvis.backends.vllm.engine import VllmEngine
    from jarvis.settings import load_settings

    env = {"JARVIS_INFERENCE_ENGINE": "vllm", "JARVIS_ADAPTER_ROOT": str(adapter_root),
           "JARVIS_VLLM_MERGE_ADAPTER": str(trained_lora["path"]), "JARVIS_VLLM_ENABLE_LORA": "false"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    engine = VllmEngine(load_settings())
    folder = engine._model_folder()
    assert (folder / MARKER).is_file() and folder.parent.name == "merged"
    assert engine._model_folder() == folder  # cached: the second start merges nothing
    assert engine.served_id(folder) == "pirate"
    assert engine.describe()["merged_adapter"] == str(trained_lora["path"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer(trained_lora["prompt"], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True) == \
        trained_lora["adapter_text"]


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
