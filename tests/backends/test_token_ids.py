"""Every TokenLogprob an engine makes carries its token's vocabulary id (`token_id`), for generated tokens and
for echoed prompt tokens: a caller that trains on what it sampled (RL through the serving engine) takes the
ids as they were decoded, never the text tokenized again.

llama.cpp and transformers run in this process on the embedded model, built the way the server builds them
(`bootstrap` + `EngineRuntime`); vLLM's conversion of its {token id: Logprob} outputs is checked on its own.
The id never reaches the OpenAI wire format.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from jarvis.bootstrap import bootstrap
from jarvis.engine import GenerationRequest, GenerationResult, PreparedRequest, TokenLogprob
from jarvis.runtime import EngineRuntime
from jarvis.serving.render import chat_logprobs, completion_logprobs

PROMPT = "The capital of France is"
TOKENS = 8
#: How far a generated token's logprob may be from the same token's, scored as part of a prompt.
TOLERANCE = {"llama_cpp": 0.3, "hf": 1e-3}


class InProcess:
    """A started runtime of one engine and the event loop it lives on."""

    def __init__(self, tmp_path, engine: str) -> None:
        boot = bootstrap(inference_engine=engine, max_model_len=512, state_dir=str(tmp_path))
        assert boot.problems == []
        self.loop = asyncio.new_event_loop()
        self.runtime = EngineRuntime(boot.settings, boot.registries, boot.plugins.relay)
        self.loop.run_until_complete(self.runtime.start())

    def generate(self, prompt: str | None = PROMPT, **fields) -> tuple[PreparedRequest, GenerationResult]:
        prepared = self.runtime.prepare(GenerationRequest(prompt=prompt, model=self.runtime.require_ready().id,
                                                          logprobs=True, **fields))
        return prepared, self.loop.run_until_complete(self.runtime.generate(prepared))

    def close(self) -> None:
        self.loop.run_until_complete(self.runtime.stop())
        self.loop.close()


@pytest.fixture(scope="module", params=["llama_cpp", "hf"])
def served(request, tmp_path_factory) -> Iterator[InProcess]:
    if request.param == "hf":
        pytest.importorskip("transformers")
        request.getfixturevalue("hf_folder")  # the embedded model, converted once
    else:
        pytest.importorskip("llama_cpp")
    running = InProcess(tmp_path_factory.mktemp(request.param), request.param)
    yield running
    running.close()


def ids_of(entries: list[TokenLogprob]) -> list[int]:
    assert all(type(e.token_id) is int for e in entries), entries
    return [e.token_id for e in entries]  # type: ignore[misc]


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=0.0, top_logprobs=1),
                                      dict(temperature=1.0, seed=1234, top_logprobs=0)], ids=["greedy", "seeded"])
def test_generated_and_prompt_tokens_carry_their_ids(served, sampling):
    engine = served.runtime.engine
    prepared, result = served.generate(max_tokens=TOKENS, echo=True, **sampling)
    generated = ids_of(result.logprobs)
    assert 0 < len(generated) == result.completion_tokens <= TOKENS
    assert engine.detokenize(generated) == result.text
    if sampling["temperature"] == 0:  # greedy: each id is its position's best token
        for token_id, e in zip(generated, result.logprobs):
            (best, best_logprob), = e.top
            assert best == engine.detokenize([token_id]) and best_logprob == pytest.approx(e.logprob)

    # The server's <bos> is context, not scored: the echoed prompt is every prompt token after it, in order.
    ids = prepared.prompt_token_ids
    assert ids is not None and engine.detokenize(ids[:1]) == served.runtime.require_ready().bos_token
    assert result.prompt_logprobs is not None and ids_of(result.prompt_logprobs) == ids[1:]

    # The same ids scored as a prompt the client sends (its own <bos> first, unscored): each generated id has
    # the logprob the generation reported for it.
    _, scored = served.generate(prompt=None, prompt_token_ids=ids + generated, max_tokens=0, echo=True,
                                temperature=0.0)
    assert scored.prompt_logprobs is not None and ids_of(scored.prompt_logprobs) == ids + generated
    assert scored.prompt_logprobs[0].logprob is None
    # llama.cpp's logits for a token decoded alone and in a prompt batch differ (other kernels, quantized
    # activations): up to about 0.15 nats on this model, while a wrong id is off by far more
    tolerance = TOLERANCE[engine.name]
    rescored = scored.prompt_logprobs[len(ids):]
    assert [e.logprob for e in rescored] == pytest.approx([e.logprob for e in result.logprobs], abs=tolerance)
    assert [e.logprob for e in scored.prompt_logprobs[1:len(ids)]] == pytest.approx(
        [e.logprob for e in result.prompt_logprobs], abs=1e-3)


def test_vllm_logprobs_take_the_ids_they_are_keyed_by():
    from jarvis.backends.vllm.engine import VllmEngine

    engine = object.__new__(VllmEngine)  # only the tokenizer is needed to convert outputs
    engine._tokenizer = SimpleNamespace(decode=lambda ids: "".join(f"<{i}>" for i in ids), bos_token_id=2)
    lp = lambda logprob, rank, text: SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)  # noqa: E731
    request = PreparedRequest(prompt="x", model="m", logprobs=True, top_logprobs=1, echo=True)
    out = engine._logprobs([7, 9], [{7: lp(-0.5, 1, "a"), 8: lp(-1.0, 2, "b")},
                                    {9: lp(-2.0, 3, "c"), 8: lp(-0.1, 1, "b")}], request)
    assert [(e.token, e.logprob, e.token_id, list(e.top)) for e in out] == [
        ("a", -0.5, 7, [("a", -0.5)]), ("c", -2.0, 9, [("b", -0.1)])]
    prompt = engine._prompt_logprobs([2, 5, 6], [None, {5: lp(-3.0, 4, "d")}, {6: lp(-4.0, 9, None)}], request)
    assert [(e.token, e.logprob, e.token_id) for e in prompt] == [("d", -3.0, 5), ("<6>", -4.0, 6)]
    client_bos = engine._prompt_logprobs([2, 5], [None, {5: lp(-3.0, 4, "d")}],
                                         PreparedRequest(prompt=None, model="m", score_bos=True))
    assert [(e.token, e.logprob, e.token_id) for e in client_bos] == [("<2>", None, 2), ("d", -3.0, 5)]


def test_the_id_stays_off_the_wire():
    with_id = TokenLogprob("Hi", -0.25, list(b"Hi"), [("Hi", -0.25)], token_id=42)
    without = TokenLogprob("Hi", -0.25, list(b"Hi"), [("Hi", -0.25)])
    assert without.token_id is None and with_id != without
    assert chat_logprobs([with_id]) == chat_logprobs([without])
    result = lambda e: GenerationResult("Hi", "stop", 1, 1, logprobs=[e])  # noqa: E731
    assert completion_logprobs(result(with_id), echo=False) == completion_logprobs(result(without), echo=False)
    assert "42" not in chat_logprobs([with_id]).model_dump_json()
