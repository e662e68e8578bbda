"""Registries (did-you-mean) and the OpenAI request models (what is accepted, what is refused)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jarvis.errors import UnknownName
from jarvis.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from jarvis.registry import Registry


def test_registry_suggests_close_names():
    registry = Registry("engine")
    for name in ("llama_cpp", "hf", "vllm"):
        registry.register(name, dict)
    assert registry.get("hf") is dict
    with pytest.raises(UnknownName) as info:
        registry.get("llama-cpp")
    assert info.value.suggestions == ["llama_cpp"]
    assert "Did you mean 'llama_cpp'" in str(info.value)
    assert list(registry) == ["hf", "llama_cpp", "vllm"]


def test_registry_refuses_a_non_callable():
    with pytest.raises(ValueError):
        Registry("engine").register("x", "not callable")  # type: ignore[arg-type]


def test_chat_request_normalises_content_and_roles():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "stop": "###", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]})
    assert [m.normalised() for m in req.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""}]
    assert req.stop == ["###"] and req.token_limit is None


def test_max_completion_tokens_wins_over_max_tokens():
    req = ChatCompletionRequest(model="m", messages=[ChatMessage(role="user", content="x")], max_tokens=5,
                                max_completion_tokens=9)
    assert req.token_limit == 9


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 17},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21},
    {"model": "", "messages": [{"role": "user", "content": "x"}]},
])
def test_chat_requests_jarvis_cannot_honour_are_refused(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_completion_prompts():
    assert CompletionRequest(model="m", prompt="a").prompts == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts == ["a", "b"]
    assert CompletionRequest(model="m", prompt="a").max_tokens == 16  # OpenAI's default
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompts == [[1, 2, 3]]  # token ids
    assert CompletionRequest(model="m", prompt=[[1, 2], [3]]).prompts == [[1, 2], [3]]
    for bad in ([], [[]], [-1], ["a", 1], [True], 5):
        with pytest.raises(ValidationError, match="prompt"):
            CompletionRequest(model="m", prompt=bad)
    with pytest.raises(ValidationError, match="Extra inputs"):  # an unknown field is never ignored
        CompletionRequest(model="m", prompt="a", frobnicate=1)
    assert CompletionRequest(model="m", prompt="a", user="u", metadata={"k": "v"}, store=True).prompts == ["a"]
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="a", suffix="b")
