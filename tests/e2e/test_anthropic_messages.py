"""Anthropic's Messages API end to end on every engine, with the clients that speak it: the official `anthropic`
SDK (create, its stream helper, count_tokens, typed errors) and `langchain-anthropic`'s `ChatAnthropic`.

The embedded model is a 270M base model: with `tool_choice` "tool" or "any", decoding is constrained to a call
whose input matches the tool's schema, so the tool tests rely on a valid call whatever the model would say.
"""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest
from conftest import ENGINE_IDS

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
ENGINES = ("llama_cpp", "hf", "vllm", "openai")
GREEDY = {"temperature": 0}  # not in the SDK's signature any more; Anthropic's API still takes it
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 30}}}
TOOLS = [{"name": "get_weather", "description": "The weather in a city now.", "input_schema": WEATHER}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
PROMPT = [{"role": "user", "content": "Write a short story about a cat."}]


@pytest.fixture(scope="module", params=ENGINES, ids=ENGINE_IDS)
def server(request, shared_engine_server):
    return shared_engine_server(request.param)


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_message_and_its_stream_say_the_same(client):
    message = client.messages.create(model=MODEL, max_tokens=16, messages=PROMPT, extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason in ("end_turn", "max_tokens") and message.content[0].type == "text"
    assert message.usage.output_tokens == (16 if message.stop_reason == "max_tokens" else message.usage.output_tokens)
    with client.messages.stream(model=MODEL, max_tokens=16, messages=PROMPT, extra_body=GREEDY) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(deltas) == text_of(final) == text_of(message)
    assert final.stop_reason == message.stop_reason
    assert (final.usage.input_tokens, final.usage.output_tokens) == (message.usage.input_tokens,
                                                                     message.usage.output_tokens)


def test_count_tokens_is_the_input_a_generation_reports(client):
    for kwargs in ({"messages": PROMPT}, {"messages": QUESTION, "system": "You are terse.", "tools": TOOLS}):
        counted = client.messages.count_tokens(model=MODEL, **kwargs).input_tokens
        generated = client.messages.create(model=MODEL, max_tokens=1, **kwargs).usage.input_tokens
        assert counted == generated > 0, kwargs


def test_a_stop_sequence_ends_the_message_and_is_named(client):
    free = text_of(client.messages.create(model=MODEL, max_tokens=24, messages=PROMPT, extra_body=GREEDY))
    words = [w for w in free.split() if len(w) > 2]
    assert words, free
    stop = words[min(2, len(words) - 1)]
    message = client.messages.create(model=MODEL, max_tokens=24, messages=PROMPT, stop_sequences=[stop, "@@@"],
                                     extra_body=GREEDY)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert text_of(message) == free[:free.index(stop)]
    with client.messages.stream(model=MODEL, max_tokens=24, messages=PROMPT, stop_sequences=[stop],
                                extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, text_of(final)) == ("stop_sequence", stop, text_of(message))


def test_a_final_assistant_turn_is_continued(client):
    """Anthropic's prefill: the answer is the continuation of the last assistant turn, which greedy decoding
    makes the rest of the answer to the same conversation without it."""
    whole = text_of(client.messages.create(model=MODEL, max_tokens=24, messages=PROMPT, extra_body=GREEDY))
    cut = whole.find(" ", len(whole) // 3)
    assert cut > 0, whole
    prefill = whole[:cut]
    rest = client.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY,
                                  messages=[*PROMPT, {"role": "assistant", "content": prefill}])
    assert whole[cut:].startswith(text_of(rest)) and text_of(rest), (whole, prefill, text_of(rest))


def test_a_forced_tool_call_validates_and_its_result_continues_the_turn(client):
    message = client.messages.create(model=MODEL, max_tokens=60, messages=QUESTION, tools=TOOLS,
                                     tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    follow_up = client.messages.create(model=MODEL, max_tokens=12, tools=TOOLS, messages=[
        *QUESTION, {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C."}]}])
    assert follow_up.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert follow_up.usage.input_tokens > message.usage.input_tokens


def test_a_streamed_tool_call_arrives_as_input_json_deltas(client):
    """One call (`disable_parallel_tool_use`): greedy, the small model would repeat the same call until
    max_tokens."""
    with client.messages.stream(model=MODEL, max_tokens=60, messages=QUESTION, tools=TOOLS, extra_body=GREEDY,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "input_json" in kinds
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER)


def test_errors_arrive_as_the_sdks_typed_exceptions(client, server):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=PROMPT)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    refused = [
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}, "image"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": TOOLS}, "nope"),
        ({"max_tokens": 100_000}, "maximum context length"),
        ({"stop_sequences": ["", "ok"]}, "stop_sequences"),
    ]
    for kwargs, named in refused:
        with pytest.raises(anthropic.BadRequestError) as bad:
            client.messages.create(**{"model": MODEL, "max_tokens": 4, "messages": PROMPT, **kwargs})
        assert bad.value.body["error"]["type"] == "invalid_request_error", kwargs
        assert named in bad.value.body["error"]["message"], (kwargs, bad.value.body)
    # the server keeps serving, and an unknown route under /v1/messages is Anthropic's 404 too
    assert client.messages.create(model=MODEL, max_tokens=2, messages=PROMPT).usage.output_tokens >= 1
    answer = httpx.post(f"{server.base_url}/v1/messages/batches", json={}, timeout=30)
    assert answer.status_code in (404, 405) and answer.json()["type"] == "error", answer.text


def test_langchain_anthropic_binds_tools_unchanged(server):
    from langchain_anthropic import ChatAnthropic
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        """The weather in a city now."""

        city: str

    llm = ChatAnthropic(base_url=server.base_url, api_key="unused", model=MODEL, max_tokens=40, temperature=0,
                        max_retries=0)
    assert isinstance(llm.invoke("Say hi").content, str)
    reply = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather" and isinstance(call["args"]["city"], str)
    assert "".join(str(chunk.content) for chunk in llm.stream("Count to three")) != ""


def test_telemetry_counts_messages_under_their_api(client, server):
    client.messages.create(model=MODEL, max_tokens=2, messages=PROMPT)
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    counted = [line for line in metrics.splitlines() if line.startswith("jarvis_requests_total{")
               and 'api="anthropic"' in line and 'operation="chat"' in line and 'status="ok"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1, metrics[:2000]
