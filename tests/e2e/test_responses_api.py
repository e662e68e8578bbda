"""The Responses API (`/v1/responses`) end to end: a real server with the llama.cpp engine and the embedded
model, driven by the official `openai` SDK (`responses.create`, `.stream`, `.parse`, `.retrieve`,
`.delete`, `.input_items.list`).

The embedded model is a 270M base model, so only what greedy or constrained decoding guarantees is
asserted: shapes, ids, usage, the chain of `previous_response_id`, schema-valid output and arguments,
and that a stream reassembles to the non-streamed answer, never wording.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
LLAMA = {"JARVIS_MAX_MODEL_LEN": "1024"}

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
                "parameters": WEATHER_PARAMETERS, "strict": True}
FORCE_WEATHER = {"type": "function", "name": "get_weather"}


class City(BaseModel):
    """Bounded lengths, so that a greedy base model ends where the schema says."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=99999999)


@pytest.fixture(scope="module")
def server(jarvis_server):
    return jarvis_server(**LLAMA)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def create(client: openai.OpenAI, **kwargs):
    return client.responses.create(model=MODEL, temperature=0, **{"max_output_tokens": 16, **kwargs})


def check_usage(response) -> None:
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= (response.max_output_tokens or 10**6)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


# --- creating responses ----------------------------------------------------------------------------------


def test_create_with_a_string(client):
    response = create(client, input="The capital of France is", max_output_tokens=8)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == 8
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.output_text == message.content[0].text
    check_usage(response)
    # the request, echoed
    assert (response.temperature, response.max_output_tokens, response.store) == (0, 8, True)
    assert response.tools == [] and response.tool_choice == "auto" and response.parallel_tool_calls is True
    assert response.instructions is None and response.previous_response_id is None


def test_items_and_instructions(client):
    items = [{"role": "user", "content": "Name a fruit."},
             {"role": "assistant", "content": [{"type": "output_text", "text": "An apple."}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name another one."}]}]
    plain = create(client, input=items)
    instructed = create(client, input=items, instructions="You are a greengrocer. Answer with one word.",
                        metadata={"suite": "responses"})
    for response in (plain, instructed):
        assert response.status in ("completed", "incomplete") and response.output[0].type == "message"
        check_usage(response)
    assert instructed.instructions.startswith("You are a greengrocer")
    assert instructed.metadata == {"suite": "responses"}
    assert instructed.usage.input_tokens > plain.usage.input_tokens  # the system message was rendered
    listed = list(client.responses.input_items.list(instructed.id, order="asc"))
    assert [(i.type, i.role) for i in listed] == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert all(i.id for i in listed) and listed[2].content[0].text == "Name another one."  # instructions are no item


def test_json_schema_output_validates(client):
    schema = City.model_json_schema()
    response = create(client, input="Describe Paris as JSON.", max_output_tokens=200,
                      text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    assert response.status == "completed", response.output_text
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema" and response.text.format.name == "city"
    parsed = client.responses.parse(model=MODEL, input="Describe Rome as JSON.", text_format=City, temperature=0,
                                    max_output_tokens=200)
    assert isinstance(parsed.output_parsed, City)


def test_json_object_output_parses(client):
    response = create(client, input="Give me a JSON object.", max_output_tokens=48,
                      text={"format": {"type": "json_object"}})
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)
    else:
        assert response.output_text.lstrip().startswith("{")


def test_stream_reassembles_to_the_non_streamed_greedy_text(client):
    prompt = "Write a short poem about the sea."
    whole = create(client, input=prompt, max_output_tokens=24)
    events = list(create(client, input=prompt, max_output_tokens=24, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-4].text == text and events[-1].response.output_text == text
    final = events[-1].response
    assert final.id == events[0].response.id and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert client.responses.retrieve(final.id).output_text == text  # a streamed response is stored too


def test_stream_helper_gives_the_final_response(client):
    with client.responses.stream(model=MODEL, input="Describe Oslo as JSON.", text_format=City, temperature=0,
                                 max_output_tokens=200) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1 and final.status == "completed"
    assert "".join(deltas) == final.output_text and isinstance(final.output_parsed, City)


# --- stored responses --------------------------------------------------------------------------------------


def test_retrieve_and_delete(client, server):
    response = create(client, input="Hello there.", max_output_tokens=4)
    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    deleted = httpx.delete(f"{server.v1}/responses/{response.id}", timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {"id": response.id, "object": "response", "deleted": True}
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(response.id)
    other = create(client, input="Hello again.", max_output_tokens=4)
    assert client.responses.delete(other.id) is None  # the SDK's own call


def test_store_false_is_not_retrievable(client):
    response = create(client, input="Do not keep this.", max_output_tokens=4, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as info:
        create(client, input="Go on.", previous_response_id=response.id)
    assert info.value.body["param"] == "previous_response_id"


def test_unknown_ids_are_404(client, server):
    for call in (client.responses.retrieve, client.responses.delete, client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError) as info:
            call("resp_missing")
        assert info.value.body["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError) as info:
        create(client, input="Go on.", previous_response_id="resp_missing")
    assert info.value.body["message"] == "Previous response with id 'resp_missing' not found."
    assert info.value.body["param"] == "previous_response_id"


def test_previous_response_id_survives_a_restart(start_jarvis, tmp_path):
    server = start_jarvis(tmp_path, **LLAMA)
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)
        first = create(client, input="My name is Ada. What is my name?",
                       instructions="You answer in one short sentence, always politely.")
    finally:
        server.stop()
    server = start_jarvis(tmp_path, **LLAMA)  # the same state dir
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)
        assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
        second = create(client, input="Say it again.", previous_response_id=first.id)
        assert second.previous_response_id == first.id and second.instructions is None  # not carried over
        # the same conversation sent whole, without the chain: the same prompt, hence the same greedy answer
        history = [{"role": "user", "content": "My name is Ada. What is my name?"},
                   {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Say it again."}]
        whole = create(client, input=history)
        assert second.usage.input_tokens == whole.usage.input_tokens
        assert second.output_text == whole.output_text
        listed = list(client.responses.input_items.list(second.id, order="asc"))
        assert [i.role for i in listed] == ["user", "assistant", "user"]
        assert listed[1].id == first.output[0].id  # the first response's own output item
        page = client.responses.input_items.list(second.id, limit=2)  # newest first
        assert [i.role for i in page.data] == ["user", "assistant"] and page.has_more
    finally:
        server.stop()


# --- refusals --------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"tools": [WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[1].type"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "http://127.0.0.1:1"}]}, "tools[0].type"),
    ({"tools": [{**WEATHER_TOOL, "colour": "red"}]}, "tools[0].colour"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "hi", "colour": "red"}]}, "input[0].colour"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "{}"}]}, "input[0].call_id"),
    ({"input": []}, "input"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice.type"),
]


@pytest.mark.parametrize("fields,param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_what_jarvis_cannot_honour_is_a_400_naming_it(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, **{"input": "Hi", **fields})
    assert info.value.body["param"] == param, info.value.body
    assert info.value.body["type"] == "invalid_request_error"


# --- function tools (needs tool calling on the chat path) -----------------------------------------------------


def only_call(response):
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1, response.output
    return calls[0]


def test_forced_function_call_then_its_output_in_a_second_turn(client):
    first = create(client, input="What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER,
                   max_output_tokens=64)
    assert first.status == "completed"
    call = only_call(first)
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    assert first.tools[0].name == "get_weather" and first.tools[0].strict is True
    assert first.tool_choice.type == "function" and first.tool_choice.name == "get_weather"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature": 21})}
    second = create(client, previous_response_id=first.id, input=[output], tools=[WEATHER_TOOL], tool_choice="none")
    assert second.status in ("completed", "incomplete") and second.output[0].type == "message"
    # the same second turn without the chain: the items handed back as the SDK gives them
    handed_back = [{"role": "user", "content": "What is the weather in Paris?"}, call.model_dump(exclude_none=True),
                   output]
    whole = create(client, input=handed_back, tools=[WEATHER_TOOL], tool_choice="none")
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text
    listed = [i.type for i in client.responses.input_items.list(second.id, order="asc")]
    assert listed == ["message", "function_call", "function_call_output"]


def test_streamed_function_call_arguments_reassemble(client):
    kwargs = dict(input="What is the weather in Oslo?", tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER,
                  max_output_tokens=64)
    whole = only_call(create(client, **kwargs))
    with client.responses.stream(model=MODEL, temperature=0, **kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1 and "".join(deltas) == done.arguments == whole.arguments
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["function_call"] and added[0].item.arguments == ""
    call = only_call(final)
    assert call.arguments == whole.arguments and call.name == "get_weather" and call.id == added[0].item.id
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    assert [e.sequence_number for e in events] == list(range(len(events)))
