"""Tool calls read out of generated text, whatever the pieces the text streams in; tools rendered into
prompts by Jarvis's convention through any chat format, and by a model's own template where it has one."""

from __future__ import annotations

import json

import pytest

from jarvis.engine import ModelInfo, ToolUse, whole_calls
from jarvis.plugins.chat_formats.auto import auto_format
from jarvis.plugins.chat_formats.families import GEMMA
from jarvis.tool_calls import (
    JsonCallScanner,
    TaggedCallParser,
    TrailingJsonCallParser,
    call_schema,
    convention_messages,
    template_messages,
)

SIZES = (1, 2, 3, 7, 10_000)


def read(parser, text: str, size: int):
    content, deltas = "", []
    for i in range(0, len(text), size):
        c, d = parser.feed(text[i:i + size])
        content, deltas = content + c, deltas + d
    c, d = parser.finish()
    return content + c, deltas + d


def calls_of(deltas):
    return [(c.name, json.loads(c.arguments)) for c in whole_calls(deltas)]


@pytest.mark.parametrize("size", SIZES)
def test_constrained_calls_stream_their_arguments_once_the_name_is_known(size):
    text = ('[{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "n": [1, {"a": 2}]}},\n'
            ' {"name": "b", "arguments": {}}]')
    content, deltas = read(JsonCallScanner(), text, size)
    assert content == ""
    assert calls_of(deltas) == [("get_weather", {"city": 'Pa"ris}', "n": [1, {"a": 2}]}), ("b", {})]
    assert all(d.id is not None and d.name is not None for d in deltas if d.id or d.name)
    starts = [i for i, d in enumerate(deltas) if d.id]
    assert [deltas[i].index for i in starts] == [0, 1]
    assert all(d.index == 0 for d in deltas[:starts[1]])  # the first call's pieces all come before the second's


@pytest.mark.parametrize("size", SIZES)
def test_one_constrained_call_object_and_arguments_before_the_name(size):
    assert calls_of(read(JsonCallScanner(), '{"name": "f", "arguments": {"x": [1]}}', size)[1]) == [("f", {"x": [1]})]
    assert calls_of(read(JsonCallScanner(), '{"arguments": {"x": 1}, "name": "f"}', size)[1]) == [("f", {"x": 1})]


@pytest.mark.parametrize("size", SIZES)
def test_a_named_call_is_the_whole_output(size):
    content, deltas = read(JsonCallScanner("f"), ' {"a": "b"}', size)
    assert content == "" and calls_of(deltas) == [("f", {"a": "b"})]
    assert deltas[0].id.startswith("call_") and deltas[0].name == "f"


@pytest.mark.parametrize("size", SIZES)
def test_tagged_calls_leave_the_text_around_them(size):
    text = ('Let me look. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
            '<tool_call>{"name": "g", "parameters": {}}</tool_call> Done <tool_c')
    content, deltas = read(TaggedCallParser(), text, size)
    assert content == "Let me look.  Done <tool_c"
    assert calls_of(deltas) == [("f", {"a": 1}), ("g", {})]


def test_a_tag_that_holds_no_call_stays_text_and_parallel_false_keeps_one_call():
    content, deltas = read(TaggedCallParser(), "<tool_call>not json</tool_call>", 3)
    assert content == "<tool_call>not json</tool_call>" and deltas == []
    two = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert calls_of(read(TaggedCallParser(parallel=False), two, 5)[1]) == [("f", {})]
    content, _ = read(TaggedCallParser(), '<tool_call>{"name": "f"', 4)
    assert content == '<tool_call>{"name": "f"'  # cut off: the text, not half a call


@pytest.mark.parametrize("size", SIZES)
def test_mistral_and_llama3_calls(size):
    content, deltas = read(TrailingJsonCallParser("[TOOL_CALLS]"),
                           'Sure [TOOL_CALLS] [{"name": "f", "arguments": {"q": "x"}}]', size)
    assert content == "Sure " and calls_of(deltas) == [("f", {"q": "x"})]
    content, deltas = read(TrailingJsonCallParser(None), ' {"name": "f", "parameters": {"q": 1}}', size)
    assert content == "" and calls_of(deltas) == [("f", {"q": 1})]
    assert read(TrailingJsonCallParser(None), "Hello {x}", size) == ("Hello {x}", [])


WEATHER = {"name": "get_weather", "description": "Weather now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
NOARGS = {"name": "ping"}


def test_the_call_schema_follows_tool_choice():
    named = call_schema(ToolUse((WEATHER, NOARGS), "function", "get_weather"))
    assert named == WEATHER["parameters"]
    one = call_schema(ToolUse((WEATHER,), "required", parallel=False))
    assert one["properties"]["name"] == {"const": "get_weather"} and list(one["properties"]) == ["name", "arguments"]
    many = call_schema(ToolUse((WEATHER, NOARGS), "required"))
    assert many["type"] == "array" and many["minItems"] == 1 and len(many["items"]["anyOf"]) == 2
    assert many["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}


HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "18C"},
           {"role": "tool", "tool_call_id": "c2", "content": "clear"},
           {"role": "user", "content": "And tomorrow?"}]


def test_the_convention_renders_through_a_strict_format():
    """Gemma's format insists on alternating user/model turns: tool results and the next question merge
    into one user turn, calls become the model's text, the tools open the system prompt."""
    messages = convention_messages(HISTORY, ToolUse((WEATHER,), "auto"))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    prompt = GEMMA(messages, True)
    assert prompt.startswith("<start_of_turn>user\nBe brief.\n\nYou can call functions")
    assert '"name": "get_weather"' in prompt and "<tool_response>\n18C\n</tool_response>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert prompt.endswith("And tomorrow?<end_of_turn>\n<start_of_turn>model\n")
    plain = convention_messages(HISTORY, ToolUse((WEATHER,), "none"))
    assert "You can call" not in plain[0]["content"]


TEMPLATE = """{%- if tools %}<|im_start|>system
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{%- if m.tool_calls %}{% for c in m.tool_calls %}
<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}
{%- else %}
{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_model_template_that_takes_tools_renders_them_itself():
    fmt = auto_format(ModelInfo(id="m", max_model_len=64, chat_template=TEMPLATE, eos_token="<|im_end|>"))
    assert fmt.tool_prompt is not None
    prompt = fmt.tool_prompt(template_messages(HISTORY[1:4]), [{"type": "function", "function": WEATHER}], True)
    assert prompt.startswith('<|im_start|>system\n{"type": "function", "function": {"name": "get_weather"')
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    parser = fmt.tool_parser()
    rome = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    assert calls_of(read(parser, rome, 4)[1]) == [("get_weather", {"city": "Rome"})]
    plain = auto_format(ModelInfo(id="m", max_model_len=64, chat_template="{{ messages[0].content }}"))
    assert plain.tool_prompt is None  # no `tools` in the template: Jarvis's convention serves them
