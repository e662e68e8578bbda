"""The engines against each other: the same embedded model, the same plain prompts, greedy.

What may legitimately differ: llama.cpp computes with the Q4_K_M weights through its quantized kernels
(activations rounded to 8 bits), while hf and vLLM run the same weights de-quantized to float32 with
float kernels, so after some tokens a near-tie can fall the other way and the texts part. What must
not differ: the prompt's token count (one tokenizer, one `<bos>`), the completion's token count at a
fixed `max_tokens`, and the first tokens of each answer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
           "Once upon a time, there was a"]
MAX_TOKENS = 12
#: The first tokens of every answer agree across all three engines (Q4 kernels vs float included).
SAME_FIRST_TOKENS = 3


@pytest.fixture(scope="module")
def answers(shared_engine_server):
    """Each engine's answers to PROMPTS, from the session's shared server of each engine (this module only
    reads from them); each engine answers in its own thread."""
    servers = {engine: shared_engine_server(engine) for engine in ("llama_cpp", "hf", "vllm")}

    def ask(server):
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
        return [client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=1) for prompt in PROMPTS]

    with ThreadPoolExecutor(3) as pool:
        asked = {engine: pool.submit(ask, server) for engine, server in servers.items()}
        result = {engine: future.result() for engine, future in asked.items()}
    for i, prompt in enumerate(PROMPTS):
        print(f"\n{prompt!r}: " + " | ".join(f"{e}: {r[i].choices[0].text!r}" for e, r in result.items()))
    return result


def test_every_engine_counts_the_same_tokens(answers):
    for i, prompt in enumerate(PROMPTS):
        usage = {engine: (r[i].usage.prompt_tokens, r[i].usage.completion_tokens) for engine, r in answers.items()}
        assert len(set(usage.values())) == 1, (prompt, usage)
        assert usage["llama_cpp"][1] == MAX_TOKENS


def test_every_engine_begins_each_answer_with_the_same_tokens(answers):
    for i, prompt in enumerate(PROMPTS):
        first = {engine: tuple(r[i].choices[0].logprobs.tokens[:SAME_FIRST_TOKENS]) for engine, r in answers.items()}
        assert len(set(first.values())) == 1, (prompt, first)


def test_hf_answers_the_capital_of_france_like_llama_cpp(answers):
    hf, llama = answers["hf"][0].choices[0].text, answers["llama_cpp"][0].choices[0].text
    words = llama.split()[:2]
    assert words and hf.split()[:2] == words, (hf, llama)
