"""A third-party package adds an engine and a chat format through the `jarvis` entry-point group.

The package is written to a temp dir, built and pip-installed (`--target`) there,
and reaches Jarvis only through its entry point: no Jarvis code knows it. Its
engine is a fake (`echo_test`, named so): the subject here is the plugin path
and the HTTP layer's handling of a stream that fails midway, not generation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

PLUGIN_CODE = '''
"""A third-party Jarvis plugin used by the test suite: a fake echo engine and a chat format."""
import asyncio

import click
from litestar import get

from jarvis import hookimpl
from jarvis.chat_format import ChatFormat
from jarvis.engine import Engine, GenerationChunk, ModelInfo


class EchoTestEngine(Engine):
    """Fake engine: streams the prompt's words back; a prompt containing FAIL breaks midway."""

    name = "echo_test"

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def model_info(self):
        return ModelInfo(id="echo-test", max_model_len=self.settings.max_model_len)

    def tokenize(self, text, *, add_special=True):
        return list(range(len(text.split())))

    async def stream(self, request):
        words = request.prompt.split(" ")
        for i, word in enumerate(words[: request.max_tokens]):
            if i == 2 and "FAIL" in request.prompt:
                raise RuntimeError("echo engine was asked to fail")
            await asyncio.sleep(0)
            yield GenerationChunk(text=(" " if i else "") + word, token_count=1)
        n = min(len(words), request.max_tokens)
        yield GenerationChunk(text="", finish_reason="length" if n < len(words) else "stop",
                              prompt_tokens=len(words), completion_tokens=n)


def render_shouty(messages, add_generation_prompt):
    text = " ".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
    return text + (" ASSISTANT:" if add_generation_prompt else "")


@hookimpl
def jarvis_register_engines(register):
    register("echo_test", EchoTestEngine)


SEEN = {"started": [], "finished": [], "lifespan": []}


@hookimpl
def jarvis_startup(app):
    SEEN["lifespan"].append("startup")


@hookimpl
def jarvis_request_started(request):
    SEEN["started"].append(request.request_id)


@hookimpl
def jarvis_request_finished(request, result, error):
    SEEN["finished"].append({"id": request.request_id, "kind": request.kind,
                             "tokens": result.completion_tokens if result else None,
                             "error": type(error).__name__ if error else None})


@get("/echo-test/seen")
async def seen() -> dict:
    return SEEN


@hookimpl
def jarvis_register_routes(register):
    register(seen)


@hookimpl
def jarvis_register_commands(cli):
    @cli.command("echo-test-hello")
    def hello():
        """Say hello from a third-party plugin."""
        click.echo("hello from echo_test")


@hookimpl
def jarvis_register_chat_formats(register):
    register("shouty_test", lambda model_info: ChatFormat("shouty_test", render_shouty))
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "jarvis_echo_test_plugin").mkdir()
    (src / "jarvis_echo_test_plugin" / "__init__.py").write_text(PLUGIN_CODE)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "jarvis-echo-test-plugin"
        version = "0.0.1"

        [project.entry-points.jarvis]
        echo_test = "jarvis_echo_test_plugin"

        [tool.setuptools]
        packages = ["jarvis_echo_test_plugin"]
    """))
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, timeout=300)
    return str(target)


def test_plugins_command_lists_the_third_party_plugin(plugin_path, jarvis_cli):
    done = jarvis_cli("plugins", PYTHONPATH=plugin_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    line = next(text for text in lines if "echo_test" in text and "jarvis-echo-test-plugin" in text)
    assert "0.0.1" in line and "third-party" in line
    assert "echo_test" in next(text for text in lines if text.startswith("engines:"))
    assert "shouty_test" in next(text for text in lines if text.startswith("chat formats:"))


def test_the_plugin_adds_a_cli_command(plugin_path, jarvis_cli):
    done = jarvis_cli("echo-test-hello", PYTHONPATH=plugin_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello from echo_test"


def test_allow_list_keeps_it_out(plugin_path, jarvis_cli):
    done = jarvis_cli("doctor", PYTHONPATH=plugin_path, JARVIS_PLUGINS="someone_else",
                      JARVIS_INFERENCE_ENGINE="echo_test")
    assert done.returncode == 1
    assert "JARVIS_INFERENCE_ENGINE" in done.stderr and "echo_test" in done.stderr


@pytest.fixture(scope="module")
def echo_server(plugin_path, tmp_path_factory, start_jarvis):
    server = start_jarvis(tmp_path_factory.mktemp("echo"), extra_pythonpath=plugin_path,
                          JARVIS_INFERENCE_ENGINE="echo_test", JARVIS_CHAT_FORMAT="shouty_test",
                          JARVIS_PLUGINS="echo_test")
    yield server
    server.stop()


def test_the_plugin_engine_and_chat_format_serve_requests(echo_server):
    client = openai.OpenAI(base_url=echo_server.v1, api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["echo-test"]
    reply = client.chat.completions.create(model="echo-test", messages=[{"role": "user", "content": "hi there"}])
    assert reply.choices[0].message.content == "USER: hi there ASSISTANT:"
    assert reply.usage.completion_tokens == 4


def test_a_stream_that_fails_midway_ends_with_an_error_event(echo_server):
    body = {"model": "echo-test", "prompt": "one two FAIL four", "max_tokens": 10, "stream": True}
    with httpx.stream("POST", f"{echo_server.v1}/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert "".join(texts) == "one two"  # what was generated before the failure still arrived
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "asked to fail" in error["message"]
    client = openai.OpenAI(base_url=echo_server.v1, api_key="x", max_retries=0)
    assert client.completions.create(model="echo-test", prompt="still here", max_tokens=5).choices[0].text == \
        "still here"


def test_a_failure_before_streaming_is_a_500(echo_server):
    client = openai.OpenAI(base_url=echo_server.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="echo-test", prompt="a b FAIL", max_tokens=5)
    assert info.value.status_code == 500 and info.value.body["code"] == "engine_error"


def test_request_hooks_and_plugin_routes(echo_server):
    client = openai.OpenAI(base_url=echo_server.v1, api_key="x", max_retries=0)
    before = httpx.get(f"{echo_server.base_url}/echo-test/seen").json()
    assert before["lifespan"] == ["startup"]
    client.completions.create(model="echo-test", prompt="a b c", max_tokens=2)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="echo-test", prompt="a b FAIL", max_tokens=5)
    seen = httpx.get(f"{echo_server.base_url}/echo-test/seen").json()
    new = seen["finished"][len(before["finished"]):]
    assert [(f["kind"], f["tokens"], f["error"]) for f in new] == [("completion", 2, None),
                                                                   ("completion", None, "RuntimeError")]
    assert [f["id"] for f in new] == seen["started"][len(before["started"]):]
