"""Anthropic's Messages API translated onto the chat path, in-process: conversations, tools, stop reasons, the
stream's content blocks and the error shape (the e2e tests run the same through every engine)."""

from __future__ import annotations

import json

import pytest

from jarvis import protocol_anthropic as awire
from jarvis.errors import InvalidRequest, RateLimited
from jarvis.routes.messages import anthropic_error
from jarvis.serving.chat import ChoiceEvent
from jarvis.serving.messages import _Blocks, chat_body, stop_reason

TOOLS = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def body(**fields) -> awire.MessagesRequest:
    return awire.MessagesRequest.model_validate({"model": "m", "max_tokens": 8,
                                                 "messages": [{"role": "user", "content": "hi"}], **fields})


def refused(param: str, **fields) -> str:
    with pytest.raises(InvalidRequest) as error:
        chat_body(body(**fields), 8)
    assert error.value.param == param, error.value.message
    return error.value.message


def test_a_tool_loop_becomes_chat_messages_with_calls_and_tool_results():
    chat = chat_body(body(system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}], tools=TOOLS,
                          tool_choice={"type": "auto", "disable_parallel_tool_use": True}, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "Sunny"}]},
                                     {"type": "text", "text": "And tomorrow?",
                                      "cache_control": {"type": "ephemeral"}}]},
    ]), 8)
    messages = [m.normalised() for m in chat.messages]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert messages[0]["content"] == "Be brief."
    assert messages[2]["content"] == "Checking."
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                        "arguments": json.dumps({"city": "Paris"})}
    assert (messages[3]["tool_call_id"], messages[3]["content"]) == ("toolu_1", "Sunny")
    assert chat.tools[0].function.parameters == TOOLS[0]["input_schema"]
    assert (chat.tool_choice, chat.parallel_tool_calls) == ("auto", False)


@pytest.mark.parametrize(("choice", "expected"), [({"type": "any"}, "required"), ({"type": "none"}, "none"),
                                                  ({"type": "auto"}, "auto")])
def test_tool_choice_types_map_to_chats(choice, expected):
    assert chat_body(body(tools=TOOLS, tool_choice=choice), 8).tool_choice == expected
    named = chat_body(body(tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}), 8).tool_choice
    assert named.function.name == "get_weather"


def test_what_cannot_be_honoured_is_a_400_naming_its_place():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    assert "text only" in refused("messages[0].content[1].type",
                                  messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, image]}])
    assert "answers no tool_use" in refused("messages[0].content[0].tool_use_id", messages=[
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}])
    assert "assistant" in refused("messages[0].content[0].type", messages=[
        {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]}])
    refused("messages[1].content", messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]}])
    prefill = chat_body(body(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), 8)
    assert (prefill.continue_final_message, prefill.add_generation_prompt) == (True, False)
    refused("tools[0].type", tools=[{"type": "bash_20250124", "name": "bash"}])
    refused("tool_choice.name", tools=TOOLS, tool_choice={"type": "tool", "name": "other"})
    refused("tool_choice", tool_choice={"type": "any"})
    refused("thinking", thinking={"type": "enabled", "budget_tokens": 1024})
    assert chat_body(body(thinking={"type": "disabled"}), 8).messages  # the same as no thinking


def test_output_config_is_a_json_schema_constraint_and_sampling_carries_over():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_body(body(output_config={"format": {"type": "json_schema", "schema": schema}}, temperature=0.5,
                          top_k=5, stop_sequences=["END"]), 8)
    assert chat.response_format.json_schema.schema_ == schema
    assert (chat.temperature, chat.top_k, chat.stop, chat.max_tokens) == (0.5, 5, ["END"], 8)
    with pytest.raises(Exception, match="effort"):
        body(output_config={"effort": "high"})


def test_stop_reasons():
    assert stop_reason("tool_calls", None, None) == ("tool_use", None)
    assert stop_reason("length", None, ["x"]) == ("max_tokens", None)
    assert stop_reason("stop", "x", ["x"]) == ("stop_sequence", "x")
    assert stop_reason("stop", "<end_of_turn>", ["x"]) == ("end_turn", None)  # the chat format's end, not the user's
    assert stop_reason("stop", None, None) == ("end_turn", None)


def test_streamed_pieces_open_and_close_content_blocks_in_order():
    blocks = _Blocks()
    events = [*blocks.feed(ChoiceEvent(0, content="Let me ")), *blocks.feed(ChoiceEvent(0, content="check.")),
              *blocks.feed(ChoiceEvent(0, call_index=0, call_id="call_a", name="get_weather", arguments='{"ci')),
              *blocks.feed(ChoiceEvent(0, call_index=0, arguments='ty": "Paris"}')),
              *blocks.feed(ChoiceEvent(0, call_index=1, call_id="call_b", name="get_weather", arguments="{}")),
              *blocks.close()]
    payloads = [json.loads(e.split("data: ", 1)[1]) for e in events]
    assert [(p["type"], p.get("index")) for p in payloads] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2)]
    assert payloads[4]["content_block"] == {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}
    assert "".join(p["delta"]["partial_json"] for p in payloads[5:7]) == '{"city": "Paris"}'
    assert all(e.startswith(f"event: {p['type']}\n") for e, p in zip(events, payloads))


def test_errors_take_anthropics_shape_and_keep_retry_after():
    response = anthropic_error(None, RateLimited("Too many requests.", 3.2, "rate_limited"))  # type: ignore[arg-type]
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"
    assert response.content == {"type": "error", "error": {"type": "rate_limit_error", "message": "Too many requests."}}
    assert awire.error_body(503, "loading")["error"]["type"] == "overloaded_error"
