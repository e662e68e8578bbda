"""The wave scheduler's sampler: one batched draw for the rows without a seed, each row under its own limits."""

import threading

import torch

from jarvis.backends.hf.sampling import sample_rows
from jarvis.backends.hf.waves import BatchScheduler, ModelHandle, Sequence
from jarvis.engine import EngineStats, PreparedRequest
from jarvis.text_stream import StopSequenceMatcher

VOCAB = 50
# Token 0 is the most likely, then 1, 2, ...: probabilities fall off geometrically.
LOGITS = -torch.arange(VOCAB, dtype=torch.float32) * 0.7


def request(**fields) -> PreparedRequest:
    return PreparedRequest(prompt="x", model="m", **fields)


def drawn(requests: list[PreparedRequest], draws: int = 400, seed: int = 0) -> list[set[int]]:
    generator = torch.Generator().manual_seed(seed)
    rows = LOGITS.repeat(len(requests), 1)
    seen: list[set[int]] = [set() for _ in requests]
    for _ in range(draws):
        for i, token in enumerate(sample_rows(rows, requests, generator).tolist()):
            seen[i].add(token)
    return seen


def nucleus(top_p: float) -> set[int]:
    probs = torch.softmax(LOGITS, -1)
    mass_before = probs.cumsum(-1) - probs
    return {i for i in range(VOCAB) if mass_before[i] <= top_p}


def test_each_row_of_one_batch_keeps_to_its_own_limits():
    plain, top_k, top_p, min_p = drawn([request(), request(top_k=3), request(top_p=0.6), request(min_p=0.2)])
    assert top_k == {0, 1, 2}
    assert top_p == nucleus(0.6) and len(top_p) < 5
    probs = torch.softmax(LOGITS, -1)
    assert min_p == {i for i in range(VOCAB) if probs[i] >= 0.2 * probs[0]}
    assert len(plain) > len(top_k | top_p | min_p)  # no limit: the tail is drawn too


def test_a_low_temperature_row_is_near_greedy_beside_a_hot_one():
    cold, hot = drawn([request(temperature=0.05), request(temperature=2.0)], draws=200)
    assert cold == {0}
    assert len(hot) > 10


def scheduler() -> BatchScheduler:
    handle = ModelHandle(model=None, tokenizer=None, device=torch.device("cpu"), eos_ids=frozenset(),
                         lock=threading.Lock(), stats=EngineStats())
    return BatchScheduler(handle, max_batch_size=8, gather_seconds=0.0)


def row(r: PreparedRequest) -> Sequence:
    generator = None
    if r.seed is not None:
        generator = torch.Generator().manual_seed(r.seed)
    return Sequence(r, [1], emit=lambda _: None, cancel=threading.Event(), detok=None, stops=StopSequenceMatcher(()),
                    generator=generator)


def test_a_seeded_row_draws_the_same_tokens_whatever_rows_sit_beside_it():
    def tokens(neighbours: list[PreparedRequest | None], steps: int = 20) -> list[int]:
        s = scheduler()
        rows = [row(request(seed=7, temperature=1.5))] + [r and row(r) for r in neighbours]
        logits = LOGITS.repeat(len(rows), 1)
        return [int(s._pick(logits, rows)[0]) for _ in range(steps)]

    alone = tokens([])
    assert tokens([request(), request(temperature=0.0), request(seed=8, top_k=2)]) == alone
    assert tokens([None, request(), None]) == alone  # free rows of a static step (None) take no draw
    assert len(set(alone)) > 1  # it samples


def test_greedy_and_top_k_one_rows_take_the_argmax_and_shaping_leaves_the_logits_alone():
    s = scheduler()
    logits = LOGITS.repeat(3, 1)
    before = logits.clone()
    rows = [row(request(temperature=0.0)), row(request(top_k=1)), row(request(temperature=0.0, logit_bias={5: 100.0}))]
    assert s._sample(logits, rows) == [0, 0, 5]
    assert torch.equal(logits, before)  # the logprobs come from the unshaped logits
