"""`prepare` in process, against a fake engine registered through the plugin manager: every rule of the
request → engine path (what the engine honours, chat and tools, constraints, token ids, <bos>, the context
window, max_tokens) without a server or a model. The runtime around it: hooks isolated per plugin, the
built-once bootstrap."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_engine import BOS, FakeEngine, fake_bootstrap

from jarvis import hookimpl
from jarvis.engine import GenerationRequest, OutputConstraint, PreparedRequest, ToolUse
from jarvis.errors import APIError, ContextLengthExceeded, InvalidRequest
from jarvis.prepare import check_token_ids, render_chat
from jarvis.runtime import PREPARE_OFF_LOOP_BYTES, EngineRuntime

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def started_runtime(tmp_path, *plugins: object, **settings: object) -> EngineRuntime:
    boot = fake_bootstrap(*plugins, state_dir=str(tmp_path), chat_format="gemma", **settings)
    assert boot.problems == []
    runtime = EngineRuntime(boot.settings, boot.registries, boot.plugins.relay)
    asyncio.run(runtime.start())
    return runtime


@pytest.fixture
def runtime(tmp_path) -> EngineRuntime:
    return started_runtime(tmp_path)


def completion(prompt: str | None = "Hi", **fields) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, model="fake-model", **fields)


def chat(*messages: dict, **fields) -> GenerationRequest:
    return GenerationRequest(prompt=None, model="fake-model", kind="chat", messages=list(messages), **fields)


def refused(runtime: EngineRuntime, request: GenerationRequest) -> APIError:
    with pytest.raises(APIError) as info:
        runtime.prepare(request)
    return info.value


def test_a_prepared_request_is_new_and_tokenized(runtime):
    request = completion("Hi", max_tokens=4, stop=["."])
    prepared = runtime.prepare(request)
    assert isinstance(prepared, PreparedRequest) and not isinstance(request, PreparedRequest)
    assert prepared.prompt_token_ids == [1, ord("H"), ord("i")] and prepared.max_tokens == 4
    assert prepared.adapter is None and prepared.compiled_constraint is None and prepared.tool_reader is None
    assert prepared.context is request.context and request.context.engine == "fake"


def test_chat_is_rendered_with_the_format_and_its_stops(runtime):
    prepared = runtime.prepare(chat({"role": "user", "content": "Hello"}, max_tokens=2, stop=["!"]))
    assert prepared.prompt == "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    assert prepared.stop == ("!", "<end_of_turn>")


def test_a_final_assistant_turn_is_continued_or_left_open(runtime):
    """vLLM's `continue_final_message` (Anthropic's prefill): the assistant's turn is opened and its beginning
    ends the prompt; `add_generation_prompt: false` leaves the turn unopened."""
    from jarvis import protocol as wire
    from jarvis.serving.requests import turn_options

    talk = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, I am"}]
    prefill = runtime.prepare(chat(*talk, max_tokens=2, continue_final=True, add_generation_prompt=False))
    assert prefill.prompt == "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi, I am"
    closed = runtime.prepare(chat(talk[0], max_tokens=2, add_generation_prompt=False))
    assert closed.prompt == "<start_of_turn>user\nHello<end_of_turn>\n"

    def options(**fields):
        return turn_options(wire.ChatCompletionRequest(model="m", messages=fields.pop("messages", talk), **fields))

    assert options(continue_final_message=True) == {"add_generation_prompt": False, "continue_final": True}
    with pytest.raises(InvalidRequest) as both:
        options(continue_final_message=True, add_generation_prompt=True)
    assert both.value.param == "add_generation_prompt"
    with pytest.raises(InvalidRequest) as user_last:
        options(continue_final_message=True, messages=talk[:1])
    assert user_last.value.param == "messages[0]"


def test_a_conversation_the_format_cannot_render_names_messages(runtime):
    error = refused(runtime, chat({"role": "assistant", "content": "first"}, {"role": "assistant", "content": "x"}))
    assert error.status_code == 400 and error.param == "messages" and "gemma" in error.message


def test_a_long_prompt_is_prepared_off_the_event_loop(runtime, monkeypatch):
    """An engine whose tokenizer releases the GIL has a body of PREPARE_OFF_LOOP_BYTES or more prepared on a
    worker thread (the event loop goes on streaming meanwhile), with the same result and the same errors; a
    shorter body, or an engine whose tokenizer holds the GIL, is prepared on the loop."""
    threads: list[int] = []
    tokenize = runtime.engine.tokenize

    def noting(text: str, **kw: bool) -> list[int]:
        threads.append(threading.get_ident())
        return tokenize(text, **kw)

    monkeypatch.setattr(runtime.engine, "tokenize", noting)

    async def prepare(size: int, **fields: object) -> tuple[PreparedRequest, int]:
        request = completion("x" * size, **fields)
        return await runtime.off_loop(size, runtime.prepare, request), threading.get_ident()

    inline, loop = asyncio.run(prepare(PREPARE_OFF_LOOP_BYTES))  # FakeEngine holds the GIL: never moved
    monkeypatch.setattr(runtime.engine, "tokenizer_releases_gil", True)
    short, _ = asyncio.run(prepare(PREPARE_OFF_LOOP_BYTES - 1))
    moved, _ = asyncio.run(prepare(PREPARE_OFF_LOOP_BYTES))
    assert threads[0] == threads[1] == loop != threads[2]
    assert moved.prompt_token_ids == inline.prompt_token_ids
    assert len(moved.prompt_token_ids) == 1 + PREPARE_OFF_LOOP_BYTES
    with pytest.raises(ContextLengthExceeded):  # raised on the worker, raised to the handler
        asyncio.run(prepare(PREPARE_OFF_LOOP_BYTES, max_tokens=2048))
    assert threads[3] == threads[2] != loop  # the runtime's one preparing thread


def test_unset_max_tokens_fills_the_context_and_an_overflow_is_refused(runtime):
    assert runtime.prepare(completion("abc", max_tokens=None)).max_tokens == 2048 - 4
    error = refused(runtime, completion("abc", max_tokens=2045))
    assert isinstance(error, ContextLengthExceeded) and "2048 tokens" in error.message
    assert isinstance(refused(runtime, completion("x" * 2048, max_tokens=None)), ContextLengthExceeded)


def test_the_servers_max_tokens_cap(tmp_path):
    capped = started_runtime(tmp_path, max_tokens_cap=8)
    assert capped.prepare(completion(max_tokens=None)).max_tokens == 8
    error = refused(capped, completion(max_tokens=9))
    assert error.code == "max_tokens_too_large" and error.param == "max_tokens"


@pytest.mark.parametrize(("fields", "param"), [({"min_p": 0.1}, "min_p"), ({"repetition_penalty": 1.2},
                                               "repetition_penalty"), ({"logit_bias": {5: 1.0}}, "logit_bias")])
def test_what_the_engine_cannot_honour_is_a_400_naming_it(runtime, fields, param):
    error = refused(runtime, completion(**fields))
    assert error.param == param and error.code == "unsupported_parameter" and "fake engine" in error.message
    assert runtime.prepare(completion(top_k=5)).top_k == 5  # what it declares passes


def test_constraints_are_compiled_by_the_engine_or_refused(runtime):
    schema = OutputConstraint("json_schema", {"type": "object"})
    assert runtime.prepare(completion(constraint=schema)).compiled_constraint == ("compiled", "json_schema")
    assert refused(runtime, completion(constraint=OutputConstraint("regex", "a+"))).code == "unsupported_parameter"
    broken = refused(runtime, completion(constraint=OutputConstraint("json_schema", {"not": "compilable"})))
    assert broken.code == "invalid_response_format" and "unknown keyword" in broken.message


def test_a_required_tool_call_is_decoded_under_its_schema(runtime):
    tools = ToolUse((WEATHER,), "function", "get_weather")
    prepared = runtime.prepare(chat({"role": "user", "content": "Paris?"}, tool_use=tools, max_tokens=4))
    assert prepared.constraint is not None and prepared.constraint.param == "tools"
    assert prepared.constraint.spec["properties"]["city"] == {"type": "string"}
    assert prepared.tool_reader is not None and "get_weather" in prepared.prompt
    both = chat({"role": "user", "content": "Paris?"}, tool_use=tools,
                constraint=OutputConstraint("json_object", param="response_format"))
    assert refused(runtime, both).param == "response_format"


def test_token_ids_outside_the_vocabulary_are_refused_even_negative_ones(runtime):
    assert refused(runtime, completion(None, prompt_token_ids=[5, 300])).code == "invalid_token_id"
    assert refused(runtime, completion(None, prompt_token_ids=[-1])).code == "invalid_token_id"
    with pytest.raises(InvalidRequest):  # an engine that does not know its vocabulary size
        check_token_ids([3, -2], None, "tokens")
    prepared = runtime.prepare(completion(None, prompt_token_ids=[1, 72, 105], max_tokens=2))
    assert prepared.prompt == f"{BOS}Hi" and prepared.score_bos  # echo text, the client's own <bos>


def test_a_text_that_brings_its_own_bos_gets_no_second(runtime):
    prepared = runtime.prepare(completion(f"{BOS}Hi", max_tokens=2))
    assert prepared.prompt_token_ids == [1, 72, 105] and prepared.score_bos


def test_an_unknown_model_is_a_404_listing_the_served_ones(runtime):
    error = refused(runtime, GenerationRequest(prompt="x", model="nope"))
    assert error.status_code == 404 and "fake-model" in error.message


def test_tokenize_renders_tools_as_the_chat_path_does(runtime):
    """`/tokenize` and chat share `render_chat`: the functions offered are in both prompts."""
    tools = ToolUse((WEATHER,))
    messages = [{"role": "user", "content": "Paris?"}]
    prepared = runtime.prepare(chat(*messages, tool_use=tools, max_tokens=2))
    assert render_chat(runtime.chat_format("fake-model"), messages, tools) == prepared.prompt


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def jarvis_request_started(self, request) -> None:
        self.events.append(f"started {request.request_id}")

    @hookimpl
    def jarvis_request_finished(self, request, result, error) -> None:
        self.events.append(f"finished {result.text if result else error}")


class Broken:
    @hookimpl
    def jarvis_request_started(self, request) -> None:
        raise RuntimeError("a plugin's bug")

    @hookimpl
    def jarvis_request_finished(self, request, result, error) -> None:
        raise RuntimeError("a plugin's bug")


@pytest.mark.parametrize("order", ["recorder first", "broken first"])
def test_a_plugin_whose_hook_raises_hides_the_event_from_no_other(tmp_path, order, caplog):
    recorder = Recorder()
    plugins = (recorder, Broken()) if order == "recorder first" else (Broken(), recorder)
    runtime = started_runtime(tmp_path, *plugins)
    prepared = runtime.prepare(completion("abc", max_tokens=2))

    async def both() -> str:
        result = await runtime.generate(prepared)
        streamed = [c.text async for c in runtime.stream(runtime.prepare(completion("xyz", max_tokens=2)))]
        return result.text + "|" + "".join(streamed)

    assert asyncio.run(both()) == "bc|yz"
    assert [e.split(" ")[0] for e in recorder.events] == ["started", "finished", "started", "finished"]
    assert recorder.events[1] == "finished bc" and recorder.events[3] == "finished yz"
    assert "test-plugin" in caplog.text and "a plugin's bug" in caplog.text


def test_the_bootstrap_builds_plugins_once_and_the_engine_only_when_served(tmp_path):
    before = FakeEngine.built
    boot = fake_bootstrap(state_dir=str(tmp_path))
    assert FakeEngine.built == before  # checking settings builds no engine
    other = boot.with_overrides(max_tokens_cap=4)
    assert other.plugins is boot.plugins and other.registries is boot.registries
    assert other.settings.max_tokens_cap == 4 and boot.settings.max_tokens_cap is None


def test_jarvis_serve_builds_the_plugin_manager_and_the_engine_once(tmp_path, monkeypatch):
    """`jarvis serve` from its entry point to the moment uvicorn would run: one bootstrap, one engine."""
    import sys

    import uvicorn

    from jarvis import cli
    from jarvis.backends.llama_cpp.engine import LlamaCppEngine
    from jarvis.plugin_manager import JarvisPluginManager

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")  # the engine reads it only when it starts
    monkeypatch.setenv("JARVIS_MODEL_NAME", str(model))
    monkeypatch.setenv("JARVIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("JARVIS_INFERENCE_ENGINE", "llama_cpp")
    monkeypatch.setattr(sys, "argv", ["jarvis", "serve", "--port", "18999"])
    monkeypatch.setattr(cli.signal, "signal", lambda *_: None)
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, *a, **k: served.append(server.config.port))
    engines = []
    real_init = LlamaCppEngine.__init__
    monkeypatch.setattr(LlamaCppEngine, "__init__", lambda self, s: (engines.append(s), real_init(self, s))[-1])
    managers_before = JarvisPluginManager.built
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None) and served == [18999]
    assert JarvisPluginManager.built - managers_before == 1
    assert len(engines) == 1 and engines[0].port == 18999
