"""The OpenAI API end to end: a real server per engine, the embedded model, the official client.

Engines: llama.cpp, transformers, vLLM, and the upstream engine (a Jarvis in front of a llama.cpp Jarvis).
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
from conftest import ENGINE_IDS, assert_same_until_a_near_tie, free_port

from jarvis.plugins.chat_formats.families import GEMMA

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module", params=["llama_cpp", "hf", "vllm", "openai"], ids=ENGINE_IDS)
def server(request, shared_engine_server):
    """The same API suite runs against every engine that serves the embedded model: the session's server of
    each (conftest.shared_engine_server; the upstream engine is a Jarvis in front of a llama.cpp Jarvis)."""
    return shared_engine_server(request.param)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(embedded_gguf):
    from llama_cpp import Llama

    vocab = Llama(str(embedded_gguf), vocab_only=True, verbose=False)
    return lambda text, bos=True: vocab.tokenize(text.encode(), add_bos=bos, special=True)


def complete(client, prompt: str, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, **{"max_tokens": 16, "temperature": 0, **kw})


def test_models_lists_the_embedded_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_is_greedy_deterministic_with_exact_usage(client, tokenizer):
    prompt = "The capital of France is"
    first, second = complete(client, prompt), complete(client, prompt)
    assert first.choices[0].text == second.choices[0].text
    assert "Paris" in first.choices[0].text or first.choices[0].text.strip()
    assert first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == len(tokenizer(prompt))
    assert first.usage.completion_tokens == 16
    assert first.usage.total_tokens == first.usage.prompt_tokens + 16


def test_chat_uses_the_gemma_format_and_counts_its_tokens(client, tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert "<end_of_turn>" not in reply.choices[0].message.content
    assert reply.usage.prompt_tokens == len(tokenizer(GEMMA(messages, True)))


def test_stream_arrives_incrementally_and_equals_the_whole(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}],
              max_tokens=40, temperature=0, seed=7)
    whole = client.chat.completions.create(**kw)
    started = time.monotonic()
    arrivals, parts, usage, finish = [], [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        arrivals.append(time.monotonic() - started)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    content_chunks = len([p for p in parts if p])
    assert content_chunks > 3, "the stream came as one piece"
    assert arrivals[1] < arrivals[-1] * 0.8, "the first tokens did not arrive before the end"


def test_completion_stream_equals_the_whole(client):
    whole = complete(client, "Once upon a time", max_tokens=24)
    parts = [c.choices[0].text for c in complete(client, "Once upon a time", max_tokens=24, stream=True)
             if c.choices]
    assert "".join(parts) == whole.choices[0].text


def test_stop_sequence_cuts_the_text(client):
    free = complete(client, "1, 2, 3, 4,", max_tokens=20).choices[0].text
    assert len(free) > 6
    stop = free[3:6]
    cut = complete(client, "1, 2, 3, 4,", max_tokens=20, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free[: free.index(stop)]
    streamed = "".join(c.choices[0].text for c in
                       complete(client, "1, 2, 3, 4,", max_tokens=20, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_every_token_is_an_event_even_while_its_text_is_held_back(client):
    """One event per generated token, as vLLM's server streams: a token whose text waits (here on a stop
    string the output begins like, which never completes) is an event with empty text, so a client timing
    tokens by events (vllm bench's inter-token latency) counts each one."""
    prompt, n = "1, 2, 3, 4,", 12
    free = complete(client, prompt, max_tokens=n, extra_body={"ignore_eos": True}).choices[0].text
    stop = free[:4] + "\u2603\u2603"
    kw = dict(max_tokens=n, stop=[stop], stream=True, extra_body={"ignore_eos": True})
    events = [c.choices[0] for c in complete(client, prompt, **kw) if c.choices]
    assert "".join(e.text for e in events) == free
    tokens = [e.text for e in events if e.finish_reason is None]
    assert len(tokens) in (n - 1, n), tokens  # the last token's event may carry the finish_reason
    assert "" in tokens, "no token's text was held back by the stop string's start"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kw)
    deltas = [c.choices[0] for c in chat if c.choices][1:]  # after the opening event, which carries the role
    assert len([d for d in deltas if d.finish_reason is None]) in (n - 1, n)


def test_a_special_token_stops_like_any_stop_string(client):
    """A chat format's stop is a special token (Gemma's <end_of_turn>, id 106): vLLM matches stop strings on
    text without special tokens, so the engine must stop on it as a token. logit_bias makes it the only
    choice after the first token."""
    free = complete(client, "The capital of France is", max_tokens=6)
    assert free.choices[0].finish_reason == "length"
    cut = complete(client, "The capital of France is", max_tokens=6, stop=["<end_of_turn>"],
                   logit_bias={"106": 100})
    assert cut.choices[0].finish_reason == "stop", cut.choices[0]
    assert cut.usage.completion_tokens <= 1 and "<end_of_turn>" not in cut.choices[0].text

def test_seed_makes_sampling_repeatable(client):
    kw = dict(temperature=1.0, max_tokens=12, seed=1234)
    a, b = complete(client, "My favourite food is", **kw), complete(client, "My favourite food is", **kw)
    assert a.choices[0].text == b.choices[0].text
    others = {complete(client, "My favourite food is", temperature=1.0, max_tokens=12, seed=s).choices[0].text
              for s in (1, 2, 3)}
    assert len(others) > 1, "different seeds gave identical samples"


def test_concurrent_requests_get_their_own_answers(client):
    """Each of six concurrent requests gets the answer to its own prompt. Batching engines (vLLM, llama.cpp's
    slots) compute a row's logits in another batch shape than alone, so a greedy answer may part from the
    lone one at a near-tie (the two likeliest tokens within 0.3 nats), and only there."""
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(6)]  # more than llama.cpp's slots
    alone = {p: complete(client, p, max_tokens=8, logprobs=2).choices[0] for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = dict(zip(prompts, pool.map(lambda p: complete(client, p, max_tokens=8, logprobs=2).choices[0],
                                              prompts)))
    for prompt in prompts:
        assert_same_until_a_near_tie(alone[prompt].logprobs, together[prompt].logprobs)


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the best


def test_completion_echo_logprobs_score_the_prompt(client, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog"
    scored = complete(client, prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt
    lp = choice.logprobs
    assert "".join(lp.tokens) == prompt
    assert len(lp.tokens) == len(tokenizer(prompt)) - 1  # every token but BOS, which is context
    assert all(v is not None and v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == prompt.rindex(lp.tokens[-1])
    # the same tokens scored one prediction at a time agree with the one-pass scores
    generated = complete(client, prompt, max_tokens=4, echo=True, logprobs=0)
    assert generated.choices[0].text.startswith(prompt)
    n = len(lp.tokens)
    assert generated.choices[0].logprobs.token_logprobs[:n] == pytest.approx(lp.token_logprobs, abs=1e-3)
    # a coherent sentence scores better than the same words shuffled
    shuffled = complete(client, "lazy the over fox dog quick jumps The brown", max_tokens=0, echo=True, logprobs=0)
    assert sum(lp.token_logprobs) > sum(shuffled.choices[0].logprobs.token_logprobs)


def test_several_prompts_give_several_choices(client):
    reply = complete(client, ["Red is a", "Blue is a"], max_tokens=4)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == complete(client, "Red is a", max_tokens=4).choices[0].text


# --- errors: right status, OpenAI's shape, and the server keeps serving -------------------------------


def assert_still_serving(client):
    assert complete(client, "Hello", max_tokens=2).usage.completion_tokens == 2


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b'["a list"]', None),
    (b'{"model": "gemma-3-270m"}', "messages"),
    (b'{"model": "gemma-3-270m", "messages": []}', "messages"),
    (b'{"model": "gemma-3-270m", "messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role"),
    (b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "x"}], "temperature": 5}', "temperature"),
    (b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "x"}], "n": 17}', "n"),
    (b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
])
def test_invalid_chat_requests_get_400(server, client, body, param):
    r = httpx.post(f"{server.v1}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert_still_serving(client)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    assert "gpt-17" in info.value.body["message"]
    assert_still_serving(client)


def test_prompt_longer_than_the_context_is_400(client):
    context = client.models.retrieve(MODEL).max_model_len  # vLLM's field; the upstream engine's is its upstream's
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, "word " * context)
    assert info.value.body["code"] == "context_length_exceeded"
    assert str(context) in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        complete(client, "Hello", max_tokens=context)
    long = client.completions.create(model=MODEL, prompt="word " * 256, max_tokens=1, temperature=0)
    assert long.usage.prompt_tokens > 200  # 1.3 KB: hf and vllm prepared it on a worker thread
    assert_still_serving(client)


def test_unknown_route_is_404_in_openai_shape(server, client):
    r = httpx.get(f"{server.v1}/nothing-here")
    assert r.status_code == 404
    assert error_of(r)["type"] == "not_found_error"
    assert_still_serving(client)


def test_client_disconnect_stops_generation(server, client):
    stream = client.completions.create(model=MODEL, prompt="A long story:", max_tokens=400, temperature=0.8,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while server.health()["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    before = server.health()
    time.sleep(1.0)
    after = server.health()
    assert before["requests_in_flight"] == 0
    assert after["tokens_generated"] == before["tokens_generated"], "generation went on after the disconnect"
    assert after["requests_cancelled"] >= 1
    assert_still_serving(client)


def test_openapi_schema_is_served(server):
    schema = httpx.get(f"{server.base_url}/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/completions" in schema["paths"]


# --- servers configured otherwise ------------------------------------------------------------------


def test_api_keys_are_required_when_configured(jarvis_server):
    server = jarvis_server(JARVIS_API_KEYS="k-one,k-two")
    anonymous = openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        anonymous.models.list()
    assert info.value.status_code == 401 and info.value.body["type"] == "authentication_error"
    for key in ("k-one", "k-two"):
        assert openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0).models.list().data
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # health stays open


def test_engine_that_fails_its_first_start_ends_the_server_with_the_reason(jarvis_cli, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    done = jarvis_cli("serve", JARVIS_MODEL_NAME=str(broken), JARVIS_PORT=str(free_port()),
                      JARVIS_STATE_DIR=str(tmp_path / "state"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "failed to start" in done.stderr and "JARVIS_ENGINE_START_RETRY" in done.stderr


def test_engine_start_retry_keeps_a_failed_server_up_answering_503(jarvis_server, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    server = jarvis_server(JARVIS_MODEL_NAME=str(broken), JARVIS_ENGINE_START_RETRY="true")
    health = server.health()
    assert health["status"] == "failed" and health["error"]
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="broken", prompt="hi")
        assert info.value.status_code == 503
    assert httpx.get(f"{server.base_url}/health/ready").status_code == 503
    deadline = time.monotonic() + 20  # the start is tried again (1 s, then 5 s later)
    while server.health()["start_attempts"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.health()["start_attempts"] >= 2 and server.health()["status"] == "failed"


def test_chat_format_can_be_chosen_per_model(jarvis_server, tokenizer):
    from jarvis.plugins.chat_formats.families import CHATML

    server = jarvis_server(JARVIS_CHAT_FORMATS=f'{{"{MODEL}": "chatml"}}', JARVIS_SERVED_MODEL_NAME=MODEL)
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens == len(tokenizer(CHATML(messages, True)))
    assert reply.usage.prompt_tokens != len(tokenizer(GEMMA(messages, True)))
