"""Structured output and honest parameters, end to end on every engine, with the official SDK.

`response_format` (json_object, json_schema with strict), vLLM's `structured_outputs` / `guided_*`, the
sampling extensions (top_k, min_p, repetition_penalty, logit_bias, n), and the 400 that names a field
the server does not honour. The embedded model is a 270M base model: whatever it would say, constrained
decoding makes its output match the schema, greedy or sampled.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import ENGINE_IDS
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
ENGINES = ("llama_cpp", "hf", "vllm", "openai")


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=40)
    zip_code: int = Field(ge=0, le=99999)


class Person(BaseModel):
    """Nested objects, an enum, an array, required fields and additionalProperties: false. Lengths are
    bounded (strings, lists, integers) so that a base model's greedy loop ("dog", "cat", "dog", ... or digit
    after digit) ends where the schema says."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)
    favourite: Colour
    tags: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)
    address: Address


@pytest.fixture(scope="module", params=ENGINES, ids=ENGINE_IDS)
def server(request, shared_engine_server):
    return shared_engine_server(request.param)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


PERSON_PROMPT = ask("Describe a person as JSON: name, age, favourite colour, tags and address.")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_returns_a_validated_object(client, temperature):
    reply = client.chat.completions.parse(model=MODEL, messages=PERSON_PROMPT, response_format=Person,
                                          temperature=temperature, seed=7, max_tokens=400)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Person)
    jsonschema.validate(json.loads(message.content), Person.model_json_schema())


def test_streamed_parse_returns_a_validated_object(client):
    """Sampled, the harder case: greedy and sampled constrained decoding are both checked by
    test_parse_returns_a_validated_object; streaming adds only the delivery in deltas."""
    with client.chat.completions.stream(model=MODEL, messages=PERSON_PROMPT, response_format=Person,
                                        temperature=1.0, seed=3, max_tokens=400) as stream:
        deltas = [event for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1  # it streamed, not one block
    assert isinstance(final.choices[0].message.parsed, Person)


class _Incomplete(Exception):
    pass


def json_object_prefix(text: str) -> bool:
    """Whether `text` is a JSON object or the start of one: what a `json_object` answer cut by max_tokens
    must be. A small recursive-descent parser for which the end of the text means "incomplete" (fine),
    and anything JSON forbids means False."""
    pos = 0

    def peek() -> str:
        if pos >= len(text):
            raise _Incomplete
        return text[pos]

    def ws() -> None:
        nonlocal pos
        while pos < len(text) and text[pos] in " \t\n\r":
            pos += 1

    def expect(chars: str) -> str:
        nonlocal pos
        if peek() not in chars:
            raise ValueError(f"{chars!r} expected at {pos}")
        pos += 1
        return text[pos - 1]

    def string() -> None:
        nonlocal pos
        expect('"')
        while (ch := expect("".join(map(chr, range(0x20, 0x110000))))) != '"':
            if ch == "\\":
                if expect('"\\/bfnrtu') == "u":
                    for _ in range(4):
                        expect("0123456789abcdefABCDEF")

    def value() -> None:
        nonlocal pos
        ch = peek()
        if ch == "{":
            container("{", "}", member)
        elif ch == "[":
            container("[", "]", value)
        elif ch == '"':
            string()
        elif ch in "tfn":
            for want in {"t": "true", "f": "false", "n": "null"}[ch]:
                expect(want)
        else:
            number = re.match(r"-?[0-9]*(\.[0-9]*)?([eE][-+]?[0-9]*)?", text[pos:]).group()
            if pos + len(number) == len(text):
                raise _Incomplete  # a number still being written
            if not re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?", number):
                raise ValueError(f"a value expected at {pos}")
            pos += len(number)

    def member() -> None:
        string()
        ws()
        expect(":")
        ws()
        value()

    def container(opening: str, closing: str, item) -> None:
        expect(opening)
        ws()
        if peek() == closing:
            expect(closing)
            return
        while True:
            item()
            ws()
            if expect("," + closing) == closing:
                return
            ws()

    try:
        ws()
        if peek() != "{":
            return False
        value()
        ws()
        return pos == len(text)
    except _Incomplete:
        return True
    except ValueError:
        return False


def test_the_json_prefix_check_itself():
    for good in ('{"a": [1, 2.5e3, "x\\"y"], "b": {"c": null}}', '{"a": [1, 2', '{"na', '{"a": tr', '{"a": -', "{"):
        assert json_object_prefix(good), good
    for bad in ('{"a": 1 "b"', '{"a": 1}}', '{"a" 1', "[1]", '{"a": 01}', '{"a": tx', "{'a': 1}", '{"a": 1,}'):
        assert not json_object_prefix(bad), bad


def test_json_object_output_parses(client):
    """Any object may be as long as the model likes: one that ends ("stop") always parses; one cut by
    max_tokens ("length") is the start of an object, as OpenAI's is (a base model may run on: how far it
    gets depends on the engine's numerics, so both outcomes are checked, neither is required). Greedy and
    sampled: the greedy answer runs on (cut at 40 tokens, past a few members, it is checked as a prefix);
    the sampled one ends early on the local engines."""
    for temperature, seed in ((0.0, None), (1.0, 1)):
        reply = client.chat.completions.create(model=MODEL, messages=ask("Give me a short JSON object about a cat."),
                                               response_format={"type": "json_object"}, max_tokens=40,
                                               temperature=temperature, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        else:
            assert reply.usage.completion_tokens == 40
            assert json_object_prefix(choice.message.content), choice.message.content


def test_vllm_style_choice_and_json_fields(client):
    reply = client.chat.completions.create(model=MODEL, messages=ask("Is the sky blue?"), max_tokens=10,
                                           extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert reply.choices[0].message.content in ("yes", "no", "maybe")
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
              "additionalProperties": False}
    reply = client.completions.create(model=MODEL, prompt="Is water wet? Answer in JSON:", max_tokens=50,
                                      temperature=0, extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(reply.choices[0].text), schema)


def test_regex_where_the_engine_has_it(client, server):
    pattern = r"[0-9]{3}-[0-9]{4}"
    try:
        reply = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=0,
                                          extra_body={"guided_regex": pattern})
    except openai.BadRequestError as exc:  # llama.cpp has no regular-expression grammar: it says so
        # (through the upstream engine it arrives as vLLM's structured_outputs.regex, and says so)
        assert "llama_cpp engine" in exc.body["message"]
        assert exc.body["param"] in ("guided_regex", "structured_outputs")
        return
    import re

    assert re.fullmatch(pattern, reply.choices[0].text), reply.choices[0].text


def test_a_schema_the_engine_cannot_compile_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}})
    assert info.value.body["param"] == "response_format"


def test_n_choices(client):
    reply = client.chat.completions.create(model=MODEL, messages=ask("Name a fruit."), n=4, max_tokens=4,
                                           temperature=1.0, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert 4 <= reply.usage.completion_tokens <= 4 * 4  # summed over the choices
    assert len({c.message.content for c in reply.choices}) > 1  # each choice samples with its own seed
    stream = client.chat.completions.create(model=MODEL, messages=ask("Name a fruit."), n=2, max_tokens=4,
                                            temperature=1.0, seed=11, stream=True,
                                            stream_options={"include_usage": True})
    texts, finished, usage = {0: "", 1: ""}, set(), None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())
    assert usage is not None and usage.completion_tokens >= 2
    completions = client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in completions.choices] == [0, 1, 2, 3]
    assert completions.choices[0].text == completions.choices[1].text  # greedy: the same choice twice


def test_top_k_1_is_greedy_and_logit_bias_removes_a_token(client, embedded_gguf):
    prompt = "The capital of France is"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    top1 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=5,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    from llama_cpp import Llama

    vocab = Llama(str(embedded_gguf), vocab_only=True, verbose=False)
    word = greedy.choices[0].text.split()[1]  # a word of the greedy answer, e.g. "capital"
    banned = vocab.tokenize((" " + word).encode(), add_bos=False)[0]
    biased = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                       logit_bias={str(banned): -100})
    assert " " + word not in biased.choices[0].text and biased.choices[0].text != greedy.choices[0].text


def test_sampling_extensions_change_what_is_sampled(client):
    """min_p close to 1 keeps only the likeliest token, so sampling at temperature 1 gives the greedy text;
    a strong repetition penalty breaks the greedy loop of a repetitive prompt."""
    prompt = "one two one two one two one two one two"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    for seed in (1, 2):
        only_top = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=seed,
                                             extra_body={"min_p": 0.999, "top_k": 40}).choices[0].text
        assert only_top == greedy
    penalised = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"repetition_penalty": 2.0}).choices[0].text
    assert "one two" in greedy and penalised != greedy, (greedy, penalised)


@pytest.mark.parametrize("path,body", [
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/completions", {"prompt": "Hi"}),
])
def test_unknown_fields_are_a_400_naming_them_and_harmless_ones_are_accepted(server, path, body):
    base = {"model": MODEL, "max_tokens": 2, **body}
    for field, value in (("frobnicate", 1), ("min_tokens", 3), ("tools_choice", "auto")):
        answer = httpx.post(server.v1 + path, json={**base, field: value}, timeout=60)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == field and "Unrecognized request argument" in error["message"]
    if path == "/chat/completions":
        answer = httpx.post(server.v1 + path, json={**base, "messages": [
            {"role": "user", "content": "Hi", "mood": "happy"}]}, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages.0.mood"
    harmless = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    assert httpx.post(server.v1 + path, json={**base, **harmless}, timeout=60).status_code == 200


class Verdict(BaseModel):
    """Bounded by its types alone: LangChain's strict json_schema may drop maxLength/maximum (OpenAI's strict
    mode did not take them), and an unbounded field lets a greedy base model run to max_tokens."""

    model_config = ConfigDict(extra="forbid")
    answer: Literal["yes", "no"]
    certain: bool
    colour: Colour


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.v1, api_key="unused", model=MODEL, temperature=0, max_tokens=200,
                     max_retries=0)
    verdict = llm.with_structured_output(Verdict, method="json_schema").invoke(
        "Is the sky blue? Answer yes or no, say whether you are certain, and name a colour.")
    assert isinstance(verdict, Verdict)
