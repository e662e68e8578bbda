"""LoRA on the llama.cpp engine: a PEFT adapter is converted to GGUF and served per request.

The same real adapter the transformers tests use (trained with PEFT in the
session); llama.cpp's greedy answer with it must equal PEFT's offline answer.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
from conftest import assert_same_until_a_near_tie

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def server(jarvis_server, adapter_root):
    return jarvis_server(JARVIS_ADAPTER_ROOT=str(adapter_root), JARVIS_LLAMA_N_PARALLEL="2",
                         JARVIS_LLAMA_N_THREADS="1", JARVIS_MAX_MODEL_LEN="512")


def greedy(client, model: str, prompt: str) -> str:
    return scored(client, model, prompt).text


def scored(client, model: str, prompt: str):
    """The greedy completion with its tokens' logprobs and each position's two likeliest."""
    return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                     logprobs=2).choices[0]


def test_peft_adapter_served_by_llama_cpp_matches_peft(server, trained_lora):
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300)
    prompt = trained_lora["prompt"]
    # llama.cpp's base answer is its own reference: its quantized arithmetic may pick another word than
    # transformers' float32 does, a few tokens in.
    base = greedy(client, MODEL, prompt)
    r = httpx.post(f"{server.v1}/load_lora_adapter", timeout=120,
                   json={"lora_name": "pirate", "lora_path": str(trained_lora["path"])})
    assert r.status_code == 200, r.text
    alone = {MODEL: scored(client, MODEL, prompt), "pirate": scored(client, "pirate", prompt)}
    assert alone["pirate"].text == trained_lora["adapter_text"] != base == alone[MODEL].text
    # base and adapter requests at once: the adapter takes turns on the context with the base, each request
    # gets its own weights; two of a kind share a batch, so a greedy answer may part at a near-tie
    jobs = [MODEL, "pirate"] * 3
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda m: scored(client, m, prompt), jobs))
    for model, answer in zip(jobs, answers):
        assert_same_until_a_near_tie(alone[model].logprobs, answer.logprobs)
        other = alone["pirate" if model == MODEL else MODEL].text
        assert answer.text[:12] != other[:12], (model, answer.text)
    assert httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
    assert greedy(client, MODEL, prompt) == base
    with pytest.raises(openai.NotFoundError):
        greedy(client, "pirate", prompt)


def test_a_registered_adapter_that_fails_to_load_stays_registered(start_jarvis, adapter_root, tmp_path):
    """Nothing is lost: an adapter whose folder is missing at start is skipped, not forgotten."""
    import json

    state = tmp_path / "state"
    state.mkdir()
    (state / "adapters.json").write_text(json.dumps({"gone": str(adapter_root / "not-there-yet")}))
    server = start_jarvis(tmp_path, JARVIS_ADAPTER_ROOT=str(adapter_root), JARVIS_STATE_DIR=str(state))
    try:
        assert server.health()["status"] == "ready"
        assert httpx.get(f"{server.v1}/adapters").json()["data"] == []
        assert json.loads((state / "adapters.json").read_text()) == {"gone": str(adapter_root / "not-there-yet")}
        assert httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "gone"}).status_code == 200
        assert json.loads((state / "adapters.json").read_text()) == {}
    finally:
        server.stop()
