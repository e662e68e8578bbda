"""A fake engine, named as such, for tests whose subject is the runtime, not an engine.

`FakeEngine` tokenizes one id per character (plus <bos> = 1), knows a 2048-token context and a 300-id
vocabulary, and streams the prompt's last characters back. It registers as engine `fake` through a plugin
object on a real plugin manager, the way a third-party engine would (`fake_bootstrap`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from jarvis import hookimpl
from jarvis.bootstrap import Bootstrap, bootstrap
from jarvis.engine import Engine, GenerationChunk, ModelInfo, OutputConstraint, PreparedRequest
from jarvis.plugin_manager import create_plugin_manager

BOS = "<b>"


class FakeEngine(Engine):
    name = "fake"
    supports = frozenset({"top_k", "json_schema", "json_object"})
    #: How many were built in this process.
    built = 0

    def __init__(self, settings: object) -> None:
        super().__init__()
        FakeEngine.built += 1
        self.compiled: list[OutputConstraint] = []

    def model_info(self) -> ModelInfo:
        return ModelInfo(id="fake-model", max_model_len=2048, bos_token=BOS, eos_token="<e>", vocab_size=300)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        ids = [1] if add_special else []
        if text.startswith(BOS):
            ids, text = [1], text[len(BOS):]
        return ids + [min(ord(c), 299) for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(BOS if i == 1 else chr(i) for i in ids)

    def compile_constraint(self, constraint: OutputConstraint) -> object:
        if constraint.kind == "json_schema" and constraint.spec == {"not": "compilable"}:
            raise ValueError("unknown keyword 'not'")
        self.compiled.append(constraint)
        return ("compiled", constraint.kind)

    async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        text = (request.prompt or "")[-(request.max_tokens or 1):]
        for c in text:
            yield GenerationChunk(c, token_count=1)
        yield GenerationChunk("", finish_reason="stop", prompt_tokens=len(request.prompt_token_ids or ()),
                              completion_tokens=len(text))


class FakeEnginePlugin:
    @hookimpl
    def jarvis_register_engines(self, register) -> None:
        register("fake", FakeEngine)


def fake_bootstrap(*plugins: object, **settings: object) -> Bootstrap:
    """The built-in plugins plus the fake engine (and `plugins`), serving engine `fake`."""
    pm = create_plugin_manager()
    pm.register(FakeEnginePlugin(), name="fake-engine")
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"test-plugin-{i}")
    return bootstrap(plugins=pm, inference_engine="fake", **settings)
