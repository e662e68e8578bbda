"""Tool calling end to end on every engine, with the clients agent code runs: the official SDK (plain and
its stream helper), LangChain's `bind_tools` and `openai-agents`.

The embedded model is a 270M base model: with `tool_choice` "required" or a named function, decoding is
constrained to a call whose arguments match the function's schema, so the tests can rely on a valid call
whatever the model would have said; under "auto" they rely only on the shape of the answer.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import ENGINE_IDS

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
ENGINES = ("llama_cpp", "hf", "vllm", "openai")

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 30},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 20}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module", params=ENGINES, ids=ENGINE_IDS)
def server(request, shared_engine_server):
    return shared_engine_server(request.param)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def valid_call(call) -> dict:
    """The call's arguments, after checking the call is well-formed and they match the schema."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_function_is_called_with_valid_arguments(client, temperature):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                           temperature=temperature, seed=3, max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    valid_call(call)


def test_required_without_parallel_calls_makes_exactly_one_valid_call(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name in SCHEMAS
    valid_call(call)


def test_required_with_parallel_calls_makes_valid_calls(client):
    # a call takes about 20 tokens: 64 leave room for two whole calls and a third cut off (the hf engine and
    # the base model go on calling until max_tokens, so every token asked for is generated)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=64)
    choice = reply.choices[0]
    calls = choice.message.tool_calls
    assert calls and choice.finish_reason in ("tool_calls", "length"), choice
    for call in calls:  # a call cut off by max_tokens is left out: each one returned can be sent back
        valid_call(call)
    assert len({c.id for c in calls}) == len(calls)


def test_n_choices_each_make_their_call(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                           n=2, temperature=1.0, seed=11, max_tokens=120)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        valid_call(choice.message.tool_calls[0])


def test_a_streamed_call_reassembles_to_the_same_call(client):
    kwargs = dict(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=WEATHER_CHOICE, temperature=0,
                  max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    pieces = []
    with client.chat.completions.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "chunk":
                for choice in event.chunk.choices:
                    pieces += choice.delta.tool_calls or []
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert streamed.function.name == whole.function.name == "get_weather"
    assert json.loads(streamed.function.arguments) == json.loads(whole.function.arguments)
    assert pieces[0].id and pieces[0].function.name == "get_weather" and pieces[0].index == 0
    assert len(pieces) > 1, "the arguments arrive in pieces as they are generated"
    assert all(p.id is None and p.function.name is None for p in pieces[1:])


def test_a_call_its_result_and_the_answer_make_a_loop(client):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                           temperature=0, max_tokens=120)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [*QUESTION, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=12)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert isinstance(answer.message.content, str) and answer.message.content.strip()
    # the call and its result are in the prompt of the second turn (tool_choice none leaves the tools out)
    alone = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none",
                                           max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_auto_answers_with_text_or_valid_calls(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=16)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name in SCHEMAS
            json.loads(call.function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


def test_langchain_bind_tools_returns_tool_calls(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city now."""
        return "sunny"

    model = ChatOpenAI(base_url=server.v1, api_key="unused", model=MODEL, temperature=0, max_tokens=120,
                       max_retries=0)
    message = model.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert set(call["args"]) == {"city", "unit"} and all(isinstance(v, str) for v in call["args"].values())


def run_agent(server, api: str) -> tuple[list[dict], object]:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        RunConfig,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls: list[dict] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        calls.append({"city": city})
        return f"It is 18 degrees and clear in {city}."

    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)
    model = (OpenAIChatCompletionsModel(MODEL, client) if api == "chat"
             else OpenAIResponsesModel(MODEL, client))
    # A 270M base model would go on calling (it imitates the calls in its context), so the agent ends with
    # the tool's result, one of the behaviours openai-agents offers.
    agent = Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                  model=model, tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0,
                                               max_tokens=64))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=2,
                             run_config=RunConfig(tracing_disabled=True))
    return calls, result


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_openai_agent_calls_its_tool(server, api):
    calls, result = run_agent(server, api)
    [call] = calls
    assert isinstance(call["city"], str) and call["city"]
    assert result.final_output == f"It is 18 degrees and clear in {call['city']}."


# --- bad requests (validated before any engine runs: one server is enough) ----------------------


@pytest.fixture(scope="module")
def http(shared_engine_server):
    server = shared_engine_server("llama_cpp")
    with httpx.Client(base_url=server.v1, timeout=120) as client:
        yield client


BAD = {
    "a parameters schema that is not an object": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools.0.function.parameters"),
    "a function name with spaces": (
        {"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
    "two functions of one name": ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    "a tool type that is not function": ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    "tool_choice naming an unknown function": (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    "tool_choice required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "an unknown tool_choice": ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    "a tool message without a call": (
        {"messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_x", "content": "18"}]},
        "messages[1].tool_call_id"),
    "call arguments that are not JSON": (
        {"messages": [*QUESTION, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]}]},
        "messages[1].tool_calls[0].function.arguments"),
    "response_format with a required call": (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    "response_format with tools under auto": (
        {"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_bad_tool_request_is_a_400_naming_the_field(http, case):
    fields, param = BAD[case]
    response = http.post("/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 8, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    fine = http.post("/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 2})
    assert fine.status_code == 200
