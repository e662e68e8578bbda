"""The transformers engine: batching that really shares forward passes, and LoRA adapters over HTTP.

The adapter is real: a PEFT LoRA on the served model, trained for a few steps
on a fixed text so its weights are non-zero; its reference output comes from
PEFT offline, in this process.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


def hf_env(adapter_root, state_dir) -> dict[str, str]:
    return dict(JARVIS_INFERENCE_ENGINE="hf", JARVIS_ADAPTER_ROOT=str(adapter_root), JARVIS_STATE_DIR=str(state_dir),
                JARVIS_HF_MAX_BATCH_SIZE="8", JARVIS_HF_BATCH_WAIT_MS="50", JARVIS_MAX_MODEL_LEN="512")


@pytest.fixture(scope="module")
def server(jarvis_server, adapter_root, state_dir):
    return jarvis_server(**hf_env(adapter_root, state_dir))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300)


def greedy(client, model: str, prompt: str = "The best thing about Jarvis is", n: int = 12) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def load(server, name: str, path) -> httpx.Response:
    return httpx.post(f"{server.v1}/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=120)


def test_batching_shares_forward_passes(server, client):
    prompts = [f"Fact {i}: the ocean is" for i in range(6)]
    alone = [greedy(client, MODEL, p, 5) for p in prompts]
    before = server.health()["forward_passes"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: greedy(client, MODEL, p, 5), prompts))
    passes = server.health()["forward_passes"] - before
    assert together == alone
    one_at_a_time = len(prompts) * 5  # a prefill and 4 decode steps each: one wave takes 5, two take 10
    assert passes < one_at_a_time / 2, f"{passes} forward passes for {len(prompts)} concurrent requests"


def test_adapter_loads_serves_and_matches_peft(server, client, trained_lora):
    assert greedy.__defaults__[0] == trained_lora["prompt"]
    assert trained_lora["adapter_text"] != trained_lora["base_text"]
    r = load(server, "pirate", trained_lora["path"])
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 8 and r.json()["target_modules"] == ["q_proj", "v_proj"]
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, "pirate"}
    assert models["pirate"].model_extra["parent"] == MODEL
    listed = httpx.get(f"{server.v1}/adapters").json()["data"]
    assert [(a["name"], a["rank"]) for a in listed] == [("pirate", 8)]
    assert httpx.get(f"{server.v1}/engine").json()["adapters"] == ["pirate"]
    assert greedy(client, MODEL) == trained_lora["base_text"]
    assert greedy(client, "pirate") == trained_lora["adapter_text"]


@pytest.fixture
def pirate(server, trained_lora) -> str:
    """The adapter, loaded (whether or not the load test ran first)."""
    if "pirate" not in {a["name"] for a in httpx.get(f"{server.v1}/adapters").json()["data"]}:
        assert load(server, "pirate", trained_lora["path"]).status_code == 200
    return "pirate"


def test_base_and_adapter_requests_in_flight_together(server, client, trained_lora, pirate):
    jobs = [MODEL, "pirate"] * 2  # each kind twice, interleaved, all four in flight at once
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda m: greedy(client, m), jobs))
    expected = {MODEL: trained_lora["base_text"], "pirate": trained_lora["adapter_text"]}
    assert answers == [expected[m] for m in jobs]


def test_bad_adapters_get_400_with_the_reason(server, client, trained_lora, adapter_root, tmp_path, pirate):
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in trained_lora["path"].iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
    (adapter_root / "escape").symlink_to(outside, target_is_directory=True)
    no_weights = adapter_root / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((trained_lora["path"] / "adapter_config.json").read_text())
    too_big = adapter_root / "too-big"
    too_big.mkdir()
    config = json.loads((trained_lora["path"] / "adapter_config.json").read_text())
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 4096}))
    (too_big / "adapter_model.safetensors").write_bytes(b"")
    wrong_model = adapter_root / "wrong-model"
    wrong_model.mkdir()
    (wrong_model / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["attn_c_proj"]}))
    (wrong_model / "adapter_model.safetensors").write_bytes(
        (trained_lora["path"] / "adapter_model.safetensors").read_bytes())

    cases = [
        ("a", str(outside), "path_outside_root"),
        ("b", str(adapter_root / "escape"), "path_outside_root"),
        ("c", str(adapter_root / ".." / outside.name), "path_outside_root"),
        ("d", str(adapter_root / "missing"), "adapter_not_found"),
        ("e", str(no_weights), "invalid_adapter"),
        ("f", str(too_big), "rank_too_large"),
        ("g", str(wrong_model), "adapter_load_failed"),
        ("pirate", str(trained_lora["path"]), "adapter_exists"),
    ]
    for name, path, code in cases:
        r = load(server, name, path)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["code"] == code, (name, r.json())
    assert {m.id for m in client.models.list().data} == {MODEL, "pirate"}
    assert greedy(client, "pirate") == trained_lora["adapter_text"]


def test_adapters_survive_a_restart(start_jarvis, adapter_root, state_dir, trained_lora, tmp_path, pirate):
    again = start_jarvis(tmp_path, **hf_env(adapter_root, state_dir))
    try:
        client = openai.OpenAI(base_url=again.v1, api_key="x", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {MODEL, "pirate"}
        assert greedy(client, "pirate") == trained_lora["adapter_text"]
    finally:
        again.stop()


def test_unloaded_adapter_is_gone(server, client, pirate):
    r = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "pirate"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        greedy(client, "pirate")
    again = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "pirate"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"
    assert greedy(client, MODEL)


@pytest.mark.parametrize("env, setting, fix", [
    ({"JARVIS_HF_QUANTIZATION": "int8"}, "JARVIS_HF_QUANTIZATION", "unset JARVIS_HF_QUANTIZATION"),
    ({"JARVIS_HF_QUANTIZATION": "int4"}, "JARVIS_HF_QUANTIZATION", "llama_cpp"),
    ({"JARVIS_DTYPE": "fp16"}, "JARVIS_DTYPE", "bf16 or fp32"),
    ({"JARVIS_DEVICE": "cuda"}, "JARVIS_DEVICE", "JARVIS_DEVICE=cpu"),
    ({"JARVIS_MODEL_NAME": "/nonexistent"}, "JARVIS_MODEL_NAME", "save_pretrained"),
    ({"JARVIS_HF_DECODE": "graphs"}, "JARVIS_HF_DECODE", "static or dynamic"),
])
def test_what_this_machine_cannot_do_fails_at_start_with_a_fix(jarvis_cli, env, setting, fix):
    import torch

    if setting in ("JARVIS_DEVICE", "JARVIS_HF_DECODE") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = jarvis_cli("serve", JARVIS_INFERENCE_ENGINE="hf", **env)
    assert done.returncode == 2, done.stderr
    assert setting in done.stderr and fix in done.stderr


def test_models_convert_prints_the_converted_folder(jarvis_cli, hf_folder):
    done = jarvis_cli("models", "convert")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(hf_folder)
    assert (hf_folder / "model.safetensors").is_file() and (hf_folder / "tokenizer.json").is_file()


def test_static_cache_decode_matches_the_dynamic_one(server, client, jarvis_server, adapter_root, tmp_path):
    """The static-cache loop (what CUDA graphs replay on a GPU) gives the dynamic loop's answers, also for
    waves of uneven prompts, padded rows and rows that finish early."""
    static = jarvis_server(**{**hf_env(adapter_root, tmp_path / "state"), "JARVIS_HF_DECODE": "static"})
    static_client = openai.OpenAI(base_url=static.v1, api_key="x", max_retries=0, timeout=300)
    assert httpx.get(f"{static.v1}/engine").json()["batching"]["decode"] == "static"
    jobs = [(f"Fact {i}: {'the deep ' * 2 * i}ocean is", 2 + 2 * i) for i in range(4)]  # uneven prompts and ends

    def answers(c):
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(lambda job: greedy(c, MODEL, job[0], job[1]), jobs))

    assert answers(static_client) == answers(client)
