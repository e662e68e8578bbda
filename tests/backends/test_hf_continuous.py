"""The transformers engine's continuous batching (transformers' ContinuousBatchingManager) on CPU.

A real server with JARVIS_HF_BATCHING=continuous beside one with waves only: the same greedy text, a request
that arrives mid-generation finishing before the long one it joined, stops and cancellation, and each
request that the manager cannot honour (seed, logprobs, a grammar, an adapter) served by the waves, with
/v1/engine naming the path and the reason.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

from jarvis.engine import PreparedRequest

MODEL = "gemma-3-270m"


def request(**fields) -> PreparedRequest:
    return PreparedRequest(**{"prompt": "x", "model": MODEL, "max_tokens": 8, **fields})


@pytest.mark.parametrize("fields, reason", [
    ({}, None),
    ({"temperature": 0.7, "top_p": 0.9, "top_k": 40, "stop": ("\n",), "ignore_eos": True}, None),
    ({"temperature": 0.0, "seed": 3}, None),  # greedy: a seed changes nothing
    ({"temperature": 0.7, "seed": 3}, "seed"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "echo": True}, "echo"),
    ({"min_p": 0.1}, "min_p"),
    ({"repetition_penalty": 1.2}, "penalty"),
    ({"presence_penalty": 0.5}, "penalty"),
    ({"logit_bias": {5: 1.0}}, "logit_bias"),
    ({"adapter": "pirate"}, "adapter"),
    ({"max_tokens": 0}, "max_tokens=0"),
])
def test_what_the_manager_covers(fields, reason):
    from jarvis.backends.hf.continuous import uncovered

    assert uncovered(request(**{"temperature": 0.0, **fields})) == reason


def env(adapter_root, state, batching: str) -> dict[str, str]:
    return dict(JARVIS_INFERENCE_ENGINE="hf", JARVIS_HF_BATCHING=batching, JARVIS_HF_MAX_BATCH_SIZE="4",
                JARVIS_MAX_MODEL_LEN="512", JARVIS_ADAPTER_ROOT=str(adapter_root), JARVIS_STATE_DIR=str(state))


@pytest.fixture(scope="module")
def continuous(jarvis_server, hf_folder, adapter_root, tmp_path_factory):
    return jarvis_server(**env(adapter_root, tmp_path_factory.mktemp("state"), "continuous"))


@pytest.fixture(scope="module")
def waves(shared_engine_server):
    """The waves side: the session's shared hf server (its default batching is waves), which these tests only
    read from; greedy text does not depend on its batch size or context."""
    server = shared_engine_server("hf")
    assert batching(server)["continuous"] is None  # waves only
    return server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300)


def batching(server) -> dict:
    return httpx.get(f"{server.v1}/engine", timeout=30).json()["batching"]


def complete(server, prompt: str, **kw) -> openai.types.Completion:
    return client(server).completions.create(**{"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                **kw})


@pytest.mark.slow
def test_greedy_text_equals_the_waves_one_alone_and_together(continuous, waves):
    prompts = [f"Fact {i}: {'the deep ' * i}ocean is" for i in range(4)]
    expected = [complete(waves, p).choices[0].text for p in prompts]
    assert [complete(continuous, p).choices[0].text for p in prompts] == expected
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: complete(continuous, p), prompts))
    assert [r.choices[0].text for r in together] == expected
    assert all(r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length" for r in together)
    info = batching(continuous)
    assert info["served_by"].get("continuous", 0) >= 2 * len(prompts) and "waves" not in info["served_by"]
    assert info["continuous"]["in_flight"] == 0 and info["continuous"]["num_blocks"] > 0
    assert info["recent"][-1]["path"] == "continuous" and info["recent"][-1]["reason"] is None


@pytest.mark.slow
def test_a_request_joins_the_running_batch(continuous):
    """A short request sent while a long one streams finishes first: it did not wait for the long one's end."""
    finished: dict[str, float] = {}
    first_token = threading.Event()

    def long() -> None:
        stream = client(continuous).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=32,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            first_token.set()
        finished["long"] = time.monotonic()

    runner = threading.Thread(target=long)
    runner.start()
    assert first_token.wait(120)
    short = complete(continuous, "The capital of France is", max_tokens=4)
    finished["short"] = time.monotonic()
    runner.join(300)
    assert short.usage.completion_tokens == 4
    assert finished["short"] < finished["long"]


@pytest.mark.slow
def test_stops_sampling_and_cancellation(continuous, waves):
    text = complete(waves, "The capital of France is", max_tokens=24).choices[0].text
    stop = text.split()[2]
    cut = complete(continuous, "The capital of France is", max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]
    sampled = complete(continuous, "Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9,
                       extra_body={"top_k": 40, "ignore_eos": True})
    assert sampled.usage.completion_tokens == 12 and sampled.choices[0].text
    before = continuous.health()["requests_cancelled"]
    with httpx.stream("POST", f"{continuous.v1}/completions", timeout=120,
                      json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
                            "temperature": 0, "ignore_eos": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # the client goes away after the first token
    deadline = time.monotonic() + 60
    while continuous.health()["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert continuous.health()["requests_in_flight"] == 0
    assert continuous.health()["requests_cancelled"] > before
    assert batching(continuous)["continuous"]["in_flight"] == 0


@pytest.mark.slow
def test_what_it_cannot_honour_takes_the_waves_and_says_why(continuous, waves):
    cases = [({"temperature": 0.8, "seed": 7}, "seed"), ({"logprobs": 2}, "logprobs"),
             ({"extra_body": {"response_format": {"type": "json_object"}}}, "constraint")]
    prompt = "The capital of France is"
    for fields, reason in cases:
        got, want = complete(continuous, prompt, **fields), complete(waves, prompt, **fields)
        assert got.choices[0].text == want.choices[0].text, reason
        last = batching(continuous)["recent"][-1]
        assert (last["path"], last["reason"]) == ("waves", reason)


@pytest.mark.slow
def test_adapters_pause_it_and_unloading_resumes_it(continuous, trained_lora):
    r = httpx.post(f"{continuous.v1}/load_lora_adapter", timeout=120,
                   json={"lora_name": "pirate", "lora_path": str(trained_lora["path"])})
    assert r.status_code == 200, r.text
    prompt = trained_lora["prompt"]
    assert complete(continuous, prompt, model="pirate", max_tokens=12).choices[0].text == trained_lora["adapter_text"]
    assert batching(continuous)["recent"][-1]["reason"] == "adapter"
    assert complete(continuous, prompt, max_tokens=12).choices[0].text == trained_lora["base_text"]
    assert batching(continuous)["recent"][-1]["reason"] == "adapter loaded"
    assert batching(continuous)["continuous"]["paused_for_adapters"] is True
    unloaded = httpx.post(f"{continuous.v1}/unload_lora_adapter", json={"lora_name": "pirate"}, timeout=60)
    assert unloaded.status_code == 200
    assert complete(continuous, prompt, max_tokens=12).choices[0].text == trained_lora["base_text"]
    info = batching(continuous)
    assert info["recent"][-1]["path"] == "continuous" and info["continuous"]["paused_for_adapters"] is False


@pytest.mark.slow
def test_the_managers_passes_wait_for_the_models_lock(hf_folder):
    """The manager runs forward passes on its own thread over the model the waves use. Two passes at once on
    one model left later passes wrong, so each of the manager's holds the handle's lock, as each wave's does:
    while a wave holds it, the manager's request gets no token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jarvis.backends.hf.continuous import ContinuousBatcher
    from jarvis.backends.hf.waves import ModelHandle
    from jarvis.engine import EngineStats

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    handle = ModelHandle(model, tokenizer, torch.device("cpu"), frozenset({tokenizer.eos_token_id}),
                         threading.RLock(), EngineStats())
    batcher = ContinuousBatcher(handle, 2, 256, page_size=64, kv_cache_memory=0.9, kv_cache_blocks=None,
                                cuda_graphs=None)
    batcher.start()
    chunks: list = []
    finished = threading.Event()

    def emit(chunk) -> None:
        chunks.append(chunk)
        if isinstance(chunk, BaseException) or chunk.finish_reason:
            finished.set()

    try:
        with handle.lock:  # as a wave's forward pass does
            assert batcher.submit(request(temperature=0.0, max_tokens=4),
                                  tokenizer("The capital of France is").input_ids, emit, threading.Event())
            assert not finished.wait(1.0) and not chunks
        assert finished.wait(120)
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
        assert sum(c.token_count for c in chunks) == 4
    finally:
        batcher.stop()
