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
PROMPT = "The best thing about Jarvis is"


@pytest.fixture(scope="module")
def hf_folder():
    from jarvis.backends.hf_convert import embedded_hf_model
    from jarvis.settings import load_settings

    return embedded_hf_model(load_settings().data_dir)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def trained_adapter(hf_folder, adapter_root):
    """A LoRA trained for a few steps, and the base's and the adapter's greedy answers from PEFT offline."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    inputs = tokenizer(PROMPT, return_tensors="pt")

    def greedy(m) -> str:
        with torch.inference_mode():
            out = m.generate(**inputs, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)

    base_text = greedy(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    batch = tokenizer(PROMPT + " that it answers every question with pirate talk, arr!", return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    peft_model.train()
    for _ in range(4):
        loss = peft_model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    path = adapter_root / "pirate"
    peft_model.save_pretrained(path)
    return {"path": path, "base_text": base_text, "adapter_text": greedy(peft_model)}


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


def greedy(client, model: str, prompt: str = PROMPT, n: int = 12) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def load(server, name: str, path) -> httpx.Response:
    return httpx.post(f"{server.v1}/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=120)


def test_batching_shares_forward_passes(server, client):
    prompts = [f"Fact {i}: the ocean is" for i in range(6)]
    alone = [greedy(client, MODEL, p, 8) for p in prompts]
    before = server.health()["forward_passes"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: greedy(client, MODEL, p, 8), prompts))
    passes = server.health()["forward_passes"] - before
    assert together == alone
    one_at_a_time = len(prompts) * 8  # a prefill and 7 decode steps each
    assert passes < one_at_a_time / 2, f"{passes} forward passes for {len(prompts)} concurrent requests"


def test_adapter_loads_serves_and_matches_peft(server, client, trained_adapter):
    assert trained_adapter["adapter_text"] != trained_adapter["base_text"]
    r = load(server, "pirate", trained_adapter["path"])
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 8 and r.json()["target_modules"] == ["q_proj", "v_proj"]
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, "pirate"}
    assert models["pirate"].model_extra["parent"] == MODEL
    listed = httpx.get(f"{server.v1}/adapters").json()["data"]
    assert [(a["name"], a["rank"]) for a in listed] == [("pirate", 8)]
    assert httpx.get(f"{server.v1}/engine").json()["adapters"] == ["pirate"]
    assert greedy(client, MODEL) == trained_adapter["base_text"]
    assert greedy(client, "pirate") == trained_adapter["adapter_text"]


def test_base_and_adapter_requests_in_flight_together(server, client, trained_adapter):
    jobs = [MODEL, "pirate"] * 4
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda m: greedy(client, m), jobs))
    expected = {MODEL: trained_adapter["base_text"], "pirate": trained_adapter["adapter_text"]}
    assert answers == [expected[m] for m in jobs]


def test_bad_adapters_get_400_with_the_reason(server, client, trained_adapter, adapter_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in trained_adapter["path"].iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
    (adapter_root / "escape").symlink_to(outside, target_is_directory=True)
    no_weights = adapter_root / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((trained_adapter["path"] / "adapter_config.json").read_text())
    too_big = adapter_root / "too-big"
    too_big.mkdir()
    config = json.loads((trained_adapter["path"] / "adapter_config.json").read_text())
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 4096}))
    (too_big / "adapter_model.safetensors").write_bytes(b"")
    wrong_model = adapter_root / "wrong-model"
    wrong_model.mkdir()
    (wrong_model / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["attn_c_proj"]}))
    (wrong_model / "adapter_model.safetensors").write_bytes(
        (trained_adapter["path"] / "adapter_model.safetensors").read_bytes())

    cases = [
        ("a", str(outside), "path_outside_root"),
        ("b", str(adapter_root / "escape"), "path_outside_root"),
        ("c", str(adapter_root / ".." / outside.name), "path_outside_root"),
        ("d", str(adapter_root / "missing"), "adapter_not_found"),
        ("e", str(no_weights), "invalid_adapter"),
        ("f", str(too_big), "rank_too_large"),
        ("g", str(wrong_model), "adapter_load_failed"),
        ("pirate", str(trained_adapter["path"]), "adapter_exists"),
    ]
    for name, path, code in cases:
        r = load(server, name, path)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["code"] == code, (name, r.json())
    assert {m.id for m in client.models.list().data} == {MODEL, "pirate"}
    assert greedy(client, "pirate") == trained_adapter["adapter_text"]


def test_adapters_survive_a_restart(start_jarvis, adapter_root, state_dir, trained_adapter, tmp_path):
    again = start_jarvis(tmp_path, **hf_env(adapter_root, state_dir))
    try:
        client = openai.OpenAI(base_url=again.v1, api_key="x", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {MODEL, "pirate"}
        assert greedy(client, "pirate") == trained_adapter["adapter_text"]
    finally:
        again.stop()


def test_unloaded_adapter_is_gone(server, client):
    r = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "pirate"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        greedy(client, "pirate")
    again = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "pirate"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"
    assert greedy(client, MODEL)
