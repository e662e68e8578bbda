"""The Responses API's translation onto chat, without a model: items → chat messages, tools and
tool_choice → chat's, errors naming the exact item, the chat path's params renamed, and the store's
conversations surviving a reopen (a restart)."""

from __future__ import annotations

import sqlite3

import pytest

from jarvis import protocol as wire
from jarvis.bodies import validate_body
from jarvis.errors import InvalidRequest
from jarvis.protocol_responses import ResponsesRequest
from jarvis.responses_store import ResponseStore
from jarvis.serving.responses import (
    chat_messages,
    function_tools,
    input_items,
    output_items,
    responses_error,
    text_format,
    tool_choice,
)

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def test_items_become_chat_messages():
    items = input_items([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text",
                                                                                   "text": "Oslo?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look.",
                                                              "annotations": []}], "id": "msg_1"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "4 C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "6 C"}]},
    ])
    assert all(item["id"] and item["status"] == "completed" for item in items) and items[2]["id"] == "msg_1"
    messages = chat_messages("Answer in English.", items, 0)
    assert [m["role"] for m in messages] == ["system", "developer", "user", "assistant", "tool", "tool"]
    assert messages[2]["content"] == "Weather in Oslo?"
    assistant = messages[3]  # the text and both parallel calls in one assistant message
    assert assistant["content"] == "Let me look." and [c["id"] for c in assistant["tool_calls"]] == ["call_1", "call_2"]
    assert messages[5] == {"role": "tool", "tool_call_id": "call_2", "content": "6 C"}
    chat = validate_body({"model": "m", "messages": messages}, wire.ChatCompletionRequest)  # the lead's chat shape
    assert chat.messages[3].tool_calls[1].function.arguments == '{"city": "Bergen"}'


@pytest.mark.parametrize("items,param", [
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input[0].content[0].type"),
    ([{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}], "input[0].content[0].type"),
    ([{"role": "user", "content": "x", "name": "bob"}], "input[0].name"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
    ([{"type": "function_call", "call_id": "c", "name": "f"}], "input[0].arguments"),
    ([{"role": "user", "content": [{"type": "input_text", "text": "x", "colour": 1}]}], "input[0].content[0].colour"),
])
def test_bad_items_name_their_place(items, param):
    with pytest.raises(InvalidRequest) as info:
        input_items(items)
    assert info.value.param == param


def test_an_output_needs_an_earlier_call():
    earlier = input_items([{"role": "user", "content": "x"}])
    new = input_items([{"type": "function_call_output", "call_id": "call_9", "output": "1"}])
    with pytest.raises(InvalidRequest) as info:
        chat_messages(None, [*earlier, *new], len(earlier))
    assert info.value.param == "input[0].call_id" and "call_9" in info.value.message


def test_tools_and_tool_choice():
    tools = function_tools([TOOL, {**TOOL, "name": "get_time", "strict": False}])
    assert [t["strict"] for t in tools] == [True, False]  # the Responses API's default is strict
    assert tool_choice(None, tools) == ("auto", None, ["get_weather", "get_time"])
    echo, chat, allowed = tool_choice({"type": "function", "name": "get_time"}, tools)
    assert chat == {"type": "function", "function": {"name": "get_time"}} and echo["name"] == "get_time"
    allowed_tools = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    assert tool_choice(allowed_tools, tools) == (allowed_tools, "required", ["get_time"])
    for bad, param in (([{"type": "image_generation"}], "tools[0].type"), ([TOOL, TOOL], "tools[1].name"),
                       ([{"type": "function"}], "tools[0].name")):
        with pytest.raises(InvalidRequest) as info:
            function_tools(bad)
        assert info.value.param == param
    for bad, param in (("sometimes", "tool_choice"), ({"type": "web_search_preview"}, "tool_choice.type"),
                       ({"type": "function", "name": "nope"}, "tool_choice.name")):
        with pytest.raises(InvalidRequest) as info:
            tool_choice(bad, tools)
        assert info.value.param == param


def test_text_format_becomes_response_format():
    body = ResponsesRequest.model_validate({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "pick", "schema": {"type": "object"}, "strict": True}}})
    echo, response_format = text_format(body.text)
    assert echo["format"]["schema"] == {"type": "object"}
    assert response_format == {"type": "json_schema", "json_schema": {"name": "pick", "schema": {"type": "object"},
                                                                      "strict": True}}
    assert text_format(None) == ({"format": {"type": "text"}}, None)


def test_unknown_fields_are_named():
    with pytest.raises(InvalidRequest) as info:
        validate_body({"model": "m", "input": "x", "seed": 3}, ResponsesRequest)
    assert info.value.param == "seed" and info.value.code == "unrecognized_argument"
    with pytest.raises(InvalidRequest) as info:
        validate_body({"model": "m", "input": "x", "text": {"format": {"type": "text"}, "colour": 1}}, ResponsesRequest)
    assert info.value.param == "text.colour"


def test_chat_errors_are_renamed():
    error = responses_error(InvalidRequest("max_tokens is 9, above this server's limit", param="max_tokens"), [])
    assert (error.param, error.message) == ("max_output_tokens", "max_output_tokens is 9, above this server's limit")
    error = responses_error(InvalidRequest("Invalid value for 'tools.1.function.parameters': bad",
                                           param="tools.1.function.parameters"), [0, 3])
    assert error.param == "tools[3].parameters" and "'tools[3].parameters'" in error.message
    assert responses_error(InvalidRequest("x", param="response_format"), []).param == "text.format"
    assert responses_error(InvalidRequest("x", param="messages"), []).param == "input"


def test_output_items_from_a_chat_message():
    text = output_items({"role": "assistant", "content": "Hi"}, "length")
    assert [(i["type"], i["status"]) for i in text] == [("message", "incomplete")]
    calls = output_items({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "tool_calls")
    assert [(i["type"], i["call_id"], i["status"]) for i in calls] == [("function_call", "call_1", "completed")]


def test_store_keeps_conversations_across_a_reopen(tmp_path):
    path = tmp_path / "responses.sqlite3"
    store = ResponseStore(path)
    context = input_items("Hello")
    response = {"id": "resp_1", "created_at": 1, "previous_response_id": None,
                "output": output_items({"content": "Hi"}, "stop")}
    store.save(response, context)
    store.close()
    store = ResponseStore(path)  # a restart
    found = store.find("resp_1")
    assert found.response == response and found.context == context and found.owner is None
    assert found.conversation() == [*context, *response["output"]]
    assert store.delete("resp_1") and not store.delete("resp_1") and store.find("resp_1") is None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
