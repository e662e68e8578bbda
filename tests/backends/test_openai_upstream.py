"""The upstream engine: Jarvis in front of another OpenAI-compatible server (here a real llama.cpp Jarvis).

The shared API suite (tests/e2e) already runs through it; these cover what is
its own: adapters forwarded upstream, credentials, and an upstream that is
down at start or goes away while the front keeps serving.
"""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
LLAMA = {"JARVIS_INFERENCE_ENGINE": "llama_cpp", "JARVIS_MAX_MODEL_LEN": "512", "JARVIS_LLAMA_N_PARALLEL": "2",
         "JARVIS_LLAMA_N_THREADS": "1"}


def client_of(server, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=120)


def greedy(server, model: str, prompt: str) -> str:
    return client_of(server).completions.create(model=model, prompt=prompt, max_tokens=8,
                                                temperature=0).choices[0].text


def test_adapters_are_forwarded_to_the_upstream(jarvis_server, trained_lora, adapter_root):
    upstream = jarvis_server(JARVIS_ADAPTER_ROOT=str(adapter_root), **LLAMA)
    front = jarvis_server(JARVIS_INFERENCE_ENGINE="openai", JARVIS_UPSTREAM_URL=upstream.v1,
                          JARVIS_ADAPTER_ROOT=str(adapter_root))
    assert front.health()["status"] == "ready", front.log()
    loaded = httpx.post(f"{front.v1}/load_lora_adapter",
                        json={"lora_name": "pirate", "lora_path": str(trained_lora["path"])}, timeout=300)
    assert loaded.status_code == 200, loaded.text
    upstream_ids = [m["id"] for m in httpx.get(f"{upstream.v1}/models").json()["data"]]
    assert "pirate" in upstream_ids
    prompt = trained_lora["prompt"]
    assert greedy(front, "pirate", prompt) == greedy(upstream, "pirate", prompt)
    assert greedy(front, "pirate", prompt) != greedy(front, MODEL, prompt)
    assert httpx.post(f"{front.v1}/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
    assert "pirate" not in [m["id"] for m in httpx.get(f"{upstream.v1}/models").json()["data"]]


def test_upstream_credentials(jarvis_server):
    upstream = jarvis_server(JARVIS_API_KEYS="upstream-secret", **LLAMA)
    front = jarvis_server(JARVIS_INFERENCE_ENGINE="openai", JARVIS_UPSTREAM_URL=upstream.v1,
                          JARVIS_UPSTREAM_API_KEY="upstream-secret", JARVIS_API_KEYS="front-key")
    reply = client_of(front, "front-key").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3
    keyless = jarvis_server(JARVIS_INFERENCE_ENGINE="openai", JARVIS_UPSTREAM_URL=upstream.v1,
                            JARVIS_UPSTREAM_START_TIMEOUT="2", JARVIS_ENGINE_START_RETRY="true")
    health = keyless.health()
    assert health["status"] == "failed" and "JARVIS_UPSTREAM_API_KEY" in health["error"]
    assert "upstream-secret" not in keyless.log() + front.log()  # keys never reach the logs


def test_upstream_down_at_start_and_gone_later(jarvis_server, start_jarvis, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    waiting = jarvis_server(JARVIS_INFERENCE_ENGINE="openai", JARVIS_UPSTREAM_URL=nowhere,
                            JARVIS_UPSTREAM_START_TIMEOUT="1", JARVIS_ENGINE_START_RETRY="true")
    health = waiting.health()
    assert health["status"] == "failed" and "JARVIS_UPSTREAM_URL" in health["error"]
    with pytest.raises(openai.InternalServerError) as info:
        greedy(waiting, MODEL, "Hi")
    assert info.value.status_code == 503

    upstream = start_jarvis(tmp_path, **LLAMA)
    front = jarvis_server(JARVIS_INFERENCE_ENGINE="openai", JARVIS_UPSTREAM_URL=upstream.v1)
    assert greedy(front, MODEL, "Hello") == greedy(upstream, MODEL, "Hello")
    upstream.stop()
    with pytest.raises(openai.InternalServerError) as info:
        greedy(front, MODEL, "Hello")
    assert info.value.status_code == 503 and info.value.body["code"] == "upstream_unreachable"
    assert front.health()["status"] == "ready"  # the front keeps serving (and answers once the upstream is back)


def test_missing_url_is_a_configuration_error(jarvis_cli):
    done = jarvis_cli("serve", JARVIS_INFERENCE_ENGINE="openai")
    assert done.returncode == 2
    assert "JARVIS_UPSTREAM_URL" in done.stderr and "fix:" in done.stderr
