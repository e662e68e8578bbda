"""Token-level access for eval harnesses: token-id prompts, vLLM's /tokenizer_info, /tokenize and
/detokenize, and exactly one <bos> whether the server adds it or the text brings it."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module", params=["llama_cpp", "hf", "vllm"])
def server(request, shared_engine_server):
    """The session's server of the engine: these tests only read."""
    return shared_engine_server(request.param)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def post(server, path, body):
    answer = httpx.post(server.base_url + path, json=body, timeout=60)
    return answer.status_code, answer.json()


def test_tokenizer_routes_speak_vllms_shapes(server, tokenizer_ids):
    info = httpx.get(server.base_url + "/tokenizer_info", timeout=30).json()
    context = httpx.get(f"{server.v1}/models", timeout=30).json()["data"][0]["max_model_len"]
    assert info["bos_token"] == "<bos>" and info["eos_token"] == "<eos>" and info["model_max_length"] == context
    status, tokens = post(server, "/tokenize", {"prompt": TEXT})
    assert status == 200 and tokens["tokens"] == tokenizer_ids(TEXT) and tokens["count"] == len(tokens["tokens"])
    status, bare = post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False})
    assert bare["tokens"] == tokens["tokens"][1:]
    status, own = post(server, "/tokenize", {"prompt": "<bos>" + TEXT})
    assert own["tokens"] == tokens["tokens"]  # the text's <bos>, and no second one
    status, text = post(server, "/detokenize", {"tokens": bare["tokens"]})
    assert status == 200 and text["prompt"] == TEXT
    status, error = post(server, "/detokenize", {"tokens": [10**9]})
    assert status == 400 and error["error"]["param"] == "tokens"
    status, error = post(server, "/tokenize", {"prompt": TEXT, "frobnicate": 1})
    assert status == 400 and error["error"]["param"] == "frobnicate"


def test_token_id_prompts_answer_as_their_text_does(client, tokenizer_ids):
    ids = tokenizer_ids(TEXT)
    by_text = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    several = client.completions.create(model=MODEL, prompt=[ids, ids[:4]], max_tokens=4, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.usage.prompt_tokens == len(ids) + 4


def test_echo_scores_every_token_of_an_id_prompt_and_one_bos_only(client, tokenizer_ids):
    ids = tokenizer_ids(TEXT)
    text_scored = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=0).choices[0]
    id_scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[0]
    # the client's ids are all scored: its <bos> first (no logprob), then the text's tokens as before
    assert id_scored.logprobs.tokens[0] == "<bos>" and id_scored.logprobs.token_logprobs[0] is None
    assert id_scored.logprobs.token_logprobs[1:] == pytest.approx(text_scored.logprobs.token_logprobs, abs=1e-4)
    # a text that begins with <bos> is scored on one <bos>, not two (the harness's rolling perplexity)
    own = client.completions.create(model=MODEL, prompt="<bos>" + TEXT, max_tokens=0, echo=True, logprobs=0)
    assert own.usage.prompt_tokens == len(ids)
    assert own.choices[0].logprobs.token_logprobs[1:] == pytest.approx(text_scored.logprobs.token_logprobs, abs=1e-4)


def test_bad_token_ids_are_a_400(client):
    for prompt in ([10**9], [[1, 2], []], [-3]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        assert info.value.body["param"] == "prompt" and "prompt.str" not in info.value.body["message"]


@pytest.fixture(scope="module")
def tokenizer_ids(embedded_gguf):
    from llama_cpp import Llama

    vocab = Llama(str(embedded_gguf), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode(), add_bos=True, special=True)
