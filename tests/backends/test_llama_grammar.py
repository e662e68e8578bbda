"""The llama.cpp engine's grammar sampler checks the sampled token first (backends/llama_cpp/grammar.py).

It must decode what llama-cpp-python's stock sampler (the grammar applied to the whole vocabulary, then
the chain) decodes: token for token when greedy, and from the same distribution when sampling.
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp import Llama  # noqa: E402
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar  # noqa: E402

from jarvis.backends.llama_cpp import grammar as llama_grammar  # noqa: E402
from jarvis.backends.llama_cpp.grammar import GrammarCheckedSampler  # noqa: E402
from jarvis.backends.llama_cpp.slots import SamplerChain  # noqa: E402
from jarvis.engine import PreparedRequest  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                         "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2}}}
PROMPT = b"<start_of_turn>user\nDescribe a person as JSON.<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def llm(embedded_gguf):
    return Llama(str(embedded_gguf), n_ctx=512, n_threads=2, verbose=False)


def checked_sampler(llm: Llama, grammar: str, temp: float, seed: int = 7) -> GrammarCheckedSampler:
    """The engine's sampler for a request with this grammar (no top-k/top-p/min-p, no penalties)."""
    req = PreparedRequest(model="m", prompt="", temperature=temp, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    return GrammarCheckedSampler(SamplerChain(req, llm.n_vocab(), seed), llama_cpp.llama_model_get_vocab(llm.model),
                                 LlamaGrammar.from_string(grammar, verbose=False), llm.n_vocab(),
                                 greedy=temp == 0.0, seed=seed)


def stock_greedy(llm: Llama, grammar: str, limit: int) -> list[int]:
    """llama-cpp-python's own sampler: the grammar masks the whole vocabulary, then the chain picks."""
    out: list[int] = []
    for token in llm.generate(llm.tokenize(PROMPT, special=True), temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                              repeat_penalty=1.0, grammar=LlamaGrammar.from_string(grammar, verbose=False)):
        out.append(token)
        if is_end(llm, token) or len(out) >= limit:
            break
    return out


def checked_greedy(llm: Llama, sampler: GrammarCheckedSampler, limit: int) -> list[int]:
    out: list[int] = []
    llm.reset()
    llm.eval(llm.tokenize(PROMPT, special=True))
    while True:
        token = sampler.sample(llm._ctx.ctx, -1)
        out.append(token)
        if is_end(llm, token) or len(out) >= limit:
            return out
        llm.eval([token])


def is_end(llm: Llama, token: int) -> bool:
    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


@pytest.mark.slow
@pytest.mark.parametrize(("grammar", "limit"), [("json_object", 16), ("schema", 40)])
def test_greedy_matches_the_stock_sampler_token_for_token(llm, grammar, limit):
    """The stock sampler masks all 262k tokens at every step (slow), so the comparison stops after `limit`
    tokens, enough for the checked sampler's rejection path: json_object's opening (the grammar rejects the
    first pick), keys, string values and indents; the whole schema object (about 30 tokens, with several
    rejected picks) and the steps after it, where the grammar rejects every pick."""
    gbnf = JSON_GBNF if grammar == "json_object" else LlamaGrammar.from_json_schema(json.dumps(SCHEMA),
                                                                                    verbose=False)._grammar
    expected = stock_greedy(llm, gbnf, limit)
    sampler = checked_sampler(llm, gbnf, 0.0)
    assert checked_greedy(llm, sampler, limit) == expected
    assert sampler.resampled > 0  # the grammar did reject first picks: the checked path ran
    sampler.close()


@pytest.mark.slow
def test_sampling_draws_from_the_constrained_distribution(llm):
    """Many draws of the first token under `[a-z]+` (thousands of accepted tokens, inside and outside the
    head the grammar masks at once) against the exact distribution: the softmax over the accepted tokens."""
    temp, draws = 1.5, 2000
    llm.reset()
    llm.eval(llm.tokenize(b'My favourite word is "', special=True))
    sampler = checked_sampler(llm, "root ::= [a-z]+", temp)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()

    llama_cpp.llama_sampler_reset(sampler.grammar)
    candidates = sampler._candidates(logits)
    llama_cpp.llama_sampler_apply(sampler.grammar, ctypes.byref(candidates))
    rows = np.ctypeslib.as_array(candidates.data, shape=(candidates.size,))
    accepted = rows["id"][np.isfinite(rows["logit"])]
    assert accepted.size > 1000
    scaled = logits.astype(np.float64) / temp
    exact = np.zeros(llm.n_vocab())
    exact[accepted] = np.exp(scaled[accepted] - scaled[accepted].max())
    exact /= exact.sum()

    seen = np.zeros(llm.n_vocab())
    sampler.resampled = 0
    for _ in range(draws):
        llama_cpp.llama_sampler_reset(sampler.grammar)
        pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        ctypes.memmove(pointer, logits.ctypes.data, logits.nbytes)  # the same step each time
        seen[sampler.sample(llm._ctx.ctx, -1)] += 1
    sampler.close()
    print(f"resampled {sampler.resampled}, masked {sampler.masked} of {draws} draws")
    assert seen[exact == 0].sum() == 0  # nothing the grammar rejects
    assert sampler.resampled > draws // 10  # the rejection path was exercised, not only first picks

    head = np.argsort(-exact)[:10]  # the ten likeliest accepted tokens, one by one, then all the rest
    bins_expected = np.append(exact[head], 1 - exact[head].sum()) * draws
    bins_seen = np.append(seen[head], draws - seen[head].sum())
    sigma = np.sqrt(bins_expected * (1 - bins_expected / draws)) + 1
    assert np.all(np.abs(bins_seen - bins_expected) < 5 * sigma), (bins_seen, bins_expected)
    outside_head = exact.copy()
    outside_head[np.argsort(-logits)[:llama_grammar.HEADS[0]]] = 0
    assert outside_head.sum() > 0.01  # accepted tokens outside the head carry real mass in this test


BOUNDS = [(0, 99999), (0, 150), (-5, 5), (None, -3), (7, None), (-120, -45), (None, None), (100, 100), (13, 4021),
          (-1, 0)]


@pytest.mark.parametrize(("low", "high"), BOUNDS)
def test_integer_bounds_become_exact_numeral_ranges(low, high):
    """llama-cpp-python's converter drops minimum/maximum; Jarvis writes the range as GBNF. Its syntax here is
    regex-like, so the rule is checked as a regex against every integer near the bounds."""
    import random
    import re

    schema = {"type": "integer", **({"minimum": low} if low is not None else {}),
              **({"maximum": high} if high is not None else {})}
    rule = llama_grammar._integer_range(schema)
    pattern = re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), rule).replace(" ", ""))
    values = list(range(-300, 300)) + [random.Random(v).randint(-10**7, 10**7) for v in range(2000)]
    values += [b + d for b in (low, high) if b is not None for d in (-1, 0, 1)]
    for value in values:
        assert bool(pattern.fullmatch(str(value))) == ((low is None or value >= low)
                                                       and (high is None or value <= high))
    for not_json in ("01", "-0", "00", "-", "", "+1"):
        assert not pattern.fullmatch(not_json)


def test_schema_bounds_are_enforced_or_refused():
    grammar = llama_grammar.schema_to_gbnf({"type": "object", "required": ["zip"], "properties": {
        "zip": {"type": "integer", "minimum": 0, "maximum": 99999}, "n": {"type": "integer", "exclusiveMinimum": 0}}})
    LlamaGrammar.from_string(grammar, verbose=False)  # llama.cpp parses it
    zip_rule = next(line for line in grammar.splitlines() if line.startswith("zip ::="))
    assert "[1-9] [0-9]{4}" in zip_rule and "[0-9]{5}" not in zip_rule  # up to five digits, not six
    for schema, word in (({"type": "number", "maximum": 3}, "maximum"),
                         ({"type": "integer", "multipleOf": 5}, "multipleOf"),
                         ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer")):
        with pytest.raises(ValueError, match=word):
            llama_grammar.schema_to_gbnf(schema)
