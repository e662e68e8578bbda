"""A static wave takes requests while it decodes: a request that joins a running wave answers what it answers
alone, also past the model's sliding window; one that does not fit waits for room, and nobody overtakes it.

The scheduler runs in this process on the embedded model (fp32, CPU); greedy answers are compared token for
token with the same request decoded in a wave of its own.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from jarvis.backends.hf.attention import grouped_sdpa
from jarvis.backends.hf.step_graphs import MIN_PREFILL_WIDTH
from jarvis.backends.hf.waves import (
    BatchScheduler,
    IncrementalDetokenizer,
    ModelHandle,
    StreamDetokenizer,
    detokenizer,
)
from jarvis.engine import EngineStats, GenerationChunk, PreparedRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def handle(hf_folder) -> ModelHandle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32,  # the engine's attention
                                                 attn_implementation=grouped_sdpa()).eval()
    return ModelHandle(model, tokenizer, torch.device("cpu"), frozenset({tokenizer.eos_token_id}),
                       threading.Lock(), EngineStats())


class Answer:
    """One submitted request: the tokens it streams, and when it has finished."""

    def __init__(self) -> None:
        self.tokens = 0
        self.text = ""
        self.finish: str | None = None
        self.first_at = self.done_at = 0.0
        self.started = threading.Event()
        self.done = threading.Event()

    def __call__(self, chunk: GenerationChunk | BaseException) -> None:
        if isinstance(chunk, BaseException):
            self.finish = repr(chunk)
            self.done.set()
            return
        if chunk.token_count and not self.tokens:
            self.first_at = time.monotonic()
        self.tokens += chunk.token_count
        self.text += chunk.text
        if self.tokens >= 3:
            self.started.set()
        if chunk.finish_reason:
            self.finish, self.done_at = chunk.finish_reason, time.monotonic()
            self.done.set()


@pytest.fixture
def scheduler(handle):
    made: list[BatchScheduler] = []

    def make(**kw) -> BatchScheduler:
        # overlapped, as "graphs" steps on a GPU: each step launched before the last one's tokens are taken
        s = BatchScheduler(handle, max_batch_size=kw.pop("max_batch_size", 4), gather_seconds=0.0,
                           decode=kw.pop("decode", "static"), max_len=kw.pop("max_len", 1024),
                           overlap=kw.pop("overlap", True), **kw)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def submit(s: BatchScheduler, prompt_ids: list[int], max_tokens: int) -> Answer:
    answer = Answer()
    request = PreparedRequest(prompt=None, model="m", max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    s.submit(request, prompt_ids, answer, threading.Event())
    return answer


def ids(handle: ModelHandle, text: str) -> list[int]:
    return handle.tokenizer(text)["input_ids"]


def alone(s: BatchScheduler, prompt_ids: list[int], max_tokens: int) -> str:
    answer = submit(s, prompt_ids, max_tokens)
    assert answer.done.wait(300) and answer.finish == "length", answer.finish
    return answer.text


def test_requests_join_a_running_wave_and_answer_as_they_would_alone(handle, scheduler):
    s = scheduler()
    first = submit(s, ids(handle, "The history of the ocean begins with"), 28)
    assert first.started.wait(120)
    later = [ids(handle, "Fact: the moon is"), ids(handle, "A short poem about autumn leaves and rain:")]
    joined = [submit(s, p, 8) for p in later]
    for answer in (first, *joined):
        assert answer.done.wait(300) and answer.finish == "length", answer.finish
    assert s.waves == 1 and s.joined == 2, (s.waves, s.joined)
    # alone, the first request's steps computed 2 rows of the cache's 4; with the joiners in rows 1 and 2, all 4
    assert set(s.row_steps) == {2, 4} and s.row_steps[4] >= 7, s.row_steps
    assert s.overlapped >= sum(s.row_steps.values()) // 2, (s.overlapped, s.row_steps)  # joins and ends step alone
    assert [a.text for a in joined] == [alone(s, p, 8) for p in later]
    assert first.text == alone(s, ids(handle, "The history of the ocean begins with"), 28)


def test_a_row_shaped_by_what_it_generated_steps_the_wave_one_at_a_time(handle, scheduler):
    """A repetition penalty shapes a row's next logits from its last token, so a wave with such a row takes
    every step's tokens before it launches the next: alone it never overlaps; beside a plain row, both answer
    as the dynamic loop (which never runs ahead) answers them."""
    def penalised(s: BatchScheduler) -> Answer:
        answer = Answer()
        request = PreparedRequest(prompt=None, model="m", max_tokens=12, temperature=0.0, ignore_eos=True,
                                  repetition_penalty=1.5)
        s.submit(request, ids(handle, "Repeat after me: la la la la"), answer, threading.Event())
        return answer

    dynamic = scheduler(decode="dynamic")
    expected = [penalised(dynamic), submit(dynamic, ids(handle, "Once upon a time"), 20)]
    alone = scheduler()
    answers = [penalised(alone)]
    assert answers[0].done.wait(300) and alone.overlapped == 0, alone.overlapped
    s = scheduler()
    answers.append(submit(s, ids(handle, "Once upon a time"), 20))
    assert answers[1].started.wait(120)
    answers.append(penalised(s))  # joins the running wave
    for answer in (*expected, *answers):
        assert answer.done.wait(300) and answer.finish == "length", answer.finish
    assert s.joined == 1 and s.overlapped > 0, (s.joined, s.overlapped)
    assert [a.text for a in answers] == [expected[0].text, expected[1].text, expected[0].text]


@pytest.mark.parametrize("case", ["prompt longer than the wave's", "answer past the cache's end"])
def test_a_request_that_does_not_fit_waits_for_room_and_nobody_overtakes_it(handle, scheduler, case):
    if case == "prompt longer than the wave's":
        s = scheduler(max_len=96)
        misfit, n = ids(handle, "The causes of the industrial revolution, in a few words, are " * 3), 8
    else:  # alone it fits the cache (3 + 26 of 32 slots); beside the first's 7 or more it runs past the end
        s = scheduler(max_len=32)
        misfit, n = ids(handle, "Tell me"), 26
    first = submit(s, ids(handle, "Once upon a time"), 20)
    assert first.started.wait(120)
    held = submit(s, misfit, n)
    behind = submit(s, ids(handle, "Fact: the moon is"), 4)  # it would fit, but it must not pass `held`
    for answer in (first, held, behind):
        assert answer.done.wait(300) and answer.finish == "length", answer.finish
    assert first.done_at <= held.first_at <= behind.first_at
    assert held.text == alone(s, misfit, n)


def test_rows_shift_left_to_make_room_and_answer_the_same(handle, scheduler):
    """A long prompt that finished early leaves the wave's `at` far right: a request that would run past the
    cache's end joins once every row has moved left, the running row included, and nothing changes."""
    s = scheduler(max_len=62)
    long_prompt = ids(handle, "Write down every colour of the rainbow, one by one, in order, and then " * 3)[:40]
    short, late = ids(handle, "Fact: the moon is"), ids(handle, "The capital of France")
    quick = submit(s, long_prompt, 4)
    running = submit(s, short, 20)
    assert quick.done.wait(120) and not running.done.is_set()
    joiner = submit(s, late, 20)  # at 44 or more, its 20 tokens would run past the cache's 62 slots
    for answer in (running, joiner):
        assert answer.done.wait(300) and answer.finish == "length", answer.finish
    assert (s.waves, s.joined) == (1, 1) and s.shifts >= 1, (s.waves, s.joined, s.shifts)
    assert [running.text, joiner.text] == [alone(s, short, 20), alone(s, late, 20)]


def test_a_step_attends_a_small_window_and_rows_shift_to_keep_it_small(handle, scheduler):
    """A static step attends the smallest power-of-two window that holds the slots in use (from 16 here): a long
    prompt that finished early leaves `at` far right, so before the running row's step would cross into a larger
    window the rows shift left; the answers are those of steps that attend the whole cache."""
    s = scheduler(max_len=256, min_window=16)
    long_prompt = ids(handle, "Write down every colour of the rainbow, one by one, in order, and then " * 3)[:40]
    short = ids(handle, "Fact: the moon is")
    quick, running = submit(s, long_prompt, 4), submit(s, short, 40)
    for answer in (quick, running):
        assert answer.done.wait(300) and answer.finish == "length", answer.finish
    assert s.waves == 1 and s.shifts >= 1, (s.waves, s.shifts)
    assert {layer.window for layer in s._static.layers} == {64}  # the last step's 45 slots, not the cache's 256
    whole = scheduler(max_len=256, min_window=256)
    assert [quick.text, running.text] == [alone(whole, long_prompt, 4), alone(whole, short, 40)]


def test_joining_past_the_sliding_window(handle, scheduler):
    """Gemma 3's local layers see the last 512 tokens: a wave past that many slots takes a short joiner, and a
    joiner whose prompt is longer than the window (its prefill keeps only the window's last tokens there)."""
    window = handle.model.config.sliding_window
    long_prompt = ids(handle, "The quick brown fox jumps over the lazy dog. " * (window // 10 + 4))
    assert len(long_prompt) > window + 8
    s = scheduler(max_len=len(long_prompt) + 64)
    first = submit(s, long_prompt, 32)
    assert first.started.wait(300)
    later = [ids(handle, "Fact: the moon is"), long_prompt[: window + 2]]
    joined = [submit(s, p, 8) for p in later]
    for answer in (first, *joined):
        assert answer.done.wait(300) and answer.finish == "length", answer.finish
    assert s.joined == 2, s.joined
    assert [a.text for a in joined] == [alone(s, p, 8) for p in later]


def test_warm_up_compiles_the_step_once_for_every_later_window(handle, scheduler):
    """The warm-up a CUDA-graph engine runs at start: a one-request wave in the first window, three requests past
    it, each step computing all the rows as "graphs" does. Torch's compiler (its eager backend here, counting)
    compiles the step at those two, and at no later window or number of busy rows, the cache's whole width
    included: a compile there would stall a running wave for tens of seconds on a GPU. The next request answers
    what it answers on a scheduler that never compiled."""
    compiled: list[int] = []

    class Counted(BatchScheduler):
        def _compiled(self, forward):
            return torch.compile(forward, fullgraph=True,
                                 backend=lambda graph, inputs: compiled.append(1) or graph.forward)

    torch._dynamo.reset()
    # "graphs" on a CPU: the step compiled and stepped through StepGraphs, nothing captured (no CUDA); a long
    # join wait too: the warm-up's requests must not be held (one wave, not two)
    s = Counted(handle, max_batch_size=8, gather_seconds=0.0, decode="graphs", max_len=64, min_window=16,
                join_seconds=60.0)
    assert s.first_rows is False  # what "graphs" steps compute
    s.start()
    try:
        assert s.warm_up() > 0
        assert s.waves == 2, s.waves  # the three in one wave: started together, or joined before its first step
        assert s.row_steps == {8: 2} and len(compiled) == 2, (s.row_steps, compiled)
        prompt = ids(handle, "Fact: the moon is")
        later = [submit(s, ids(handle, "The history of the ocean begins with"), 40)]  # to the cache's 64 slots
        assert later[0].started.wait(120)
        later += [submit(s, prompt, 8) for _ in range(4)]  # rows 1-4 beside it: 8 rows
        for answer in later:
            assert answer.done.wait(300) and answer.finish == "length", answer.finish
        window = s._static.layers[0].window
        assert set(s.row_steps) == {8} and window == 64, (s.row_steps, window)
        assert len(compiled) == 2, compiled
        assert sorted(s._decode_step._shapes) == [(8, 16), (8, 32), (8, 64)]  # a shape (a graph) per window
        # every prefill (the waves' first requests, the joins) ran as PrefillGraphs does, padded to its width
        assert {width for _, width in s._prefills._shapes} == {MIN_PREFILL_WIDTH}, s._prefills._shapes
    finally:
        s.stop()
        torch._dynamo.reset()
    assert {a.text for a in later[1:]} == {alone(scheduler(max_len=64), prompt, 8)}


def test_join_wait_admits_arrivals_in_one_prefill_only_while_it_pays(handle, scheduler):
    s = scheduler(max_batch_size=5, join_seconds=1.0)
    stop = threading.Event()  # the running requests decode until the test ends them, however fast the steps
    running = [Answer() for _ in range(3)]
    with handle.lock:  # the first one's prefill waits for it: the others join before its first step
        for answer, text in zip(running, ("The history of the ocean begins with", "Once upon a time", "A poem:")):
            request = PreparedRequest(prompt=None, model="m", max_tokens=400, temperature=0.0, ignore_eos=True)
            s.submit(request, ids(handle, text), answer, stop)
    assert all(a.started.wait(120) for a in running)
    joined, prefills = s.joined, s.join_prefills
    sent = time.monotonic()
    arrivals = [submit(s, ids(handle, "Fact: the moon is"), 4)]
    time.sleep(0.05)
    arrivals.append(submit(s, ids(handle, "A short poem about autumn leaves and rain:"), 4))
    for answer in arrivals:
        assert answer.done.wait(300) and answer.finish == "length", answer.finish
    stop.set()
    assert all(a.done.wait(300) and a.finish == "cancelled" for a in running)
    # two arrivals, as many as the 2 free rows but fewer than the 3 decoding ones: held until the first would have
    # waited 1 s by the end of the next step, then one prefill for both (at once they would have joined within a step)
    assert (s.waves, s.joined - joined, s.join_prefills - prefills) == (1, 2, 1), (s.waves, s.joined, s.join_prefills)
    assert arrivals[0].first_at - sent >= 0.5, (arrivals[0].first_at - sent, s.step_seconds)

    few = scheduler(max_batch_size=8, join_seconds=60.0)
    first = submit(few, ids(handle, "Once upon a time"), 16)
    assert first.started.wait(120)
    last = submit(few, ids(handle, "Fact: the moon is"), 4)  # one row decodes: a prefill holds up only it
    assert last.done.wait(300) and last.finish == "length", last.finish
    assert first.done.wait(300) and last.first_at < first.done_at and few.join_prefills == 1


def test_rust_detokenizer_streams_the_same_deltas_as_the_window(handle):
    """StreamDetokenizer (tokenizers' DecodeStream) against the two-decode window, token by token: the same
    deltas, characters split across tokens held back alike, the prompt's leading space kept, and an id past the
    vocabulary shown as nothing; together the whole decode (𝔘 and 🜁 are four byte tokens each here); where
    DecodeStream fails on a token, the window goes on."""
    tok = handle.tokenizer
    prompt = ids(handle, "Write:")
    text = " The lighthouse — 灯台 𝔘 — stood 🌊🏝️ on 🜁 the cliff.\n\nÜnïcödé façade; 東京 and 서울 <start_of_turn>"
    answer = tok(text, add_special_tokens=False)["input_ids"] + [tok.backend_tokenizer.get_vocab_size() + 7]
    stream, window = detokenizer(tok, prompt), IncrementalDetokenizer(tok, prompt)
    assert isinstance(stream, StreamDetokenizer)
    deltas = [(stream.push(t), window.push(t)) for t in answer]
    assert [a for a, _ in deltas] == [b for _, b in deltas]
    assert "".join(a for a, _ in deltas) == text and any(a == "" for a, _ in deltas[:-1])
    # byte tokens on which DecodeStream raises "Invalid prefix encountered" (at the 7th): the window takes over
    broken = [199187, 237167, 106645, 237167, 349, 382, 237167, 651, 1234]
    stream, window = detokenizer(tok, prompt), IncrementalDetokenizer(tok, prompt)
    deltas = [(stream.push(t), window.push(t).replace("\ufffd", "")) for t in broken]
    assert [a for a, _ in deltas] == [b for _, b in deltas] and stream._window is not None, deltas


def test_the_prefill_shapes_a_run_used_are_captured_at_the_next_start(handle, scheduler, tmp_path, caplog):
    """A "graphs" server keeps its prefill graphs' shapes in its state dir and captures them at its next start
    (warm_prefills), not on the first requests that need them: on a CPU, each shape's buffers are made and its
    forward runs. A request of a kept shape then adds none and answers the same. A file that does not read
    captures nothing, and the scheduler serves as before; shapes this scheduler cannot meet are skipped."""
    kept = tmp_path / "state" / "prefill-shapes.json"
    short, long = ids(handle, "Fact: the moon is"), ids(handle, " ".join(["ocean"] * 40))
    assert len(short) <= MIN_PREFILL_WIDTH < len(long) <= 2 * MIN_PREFILL_WIDTH
    first = scheduler(prefill_graphs=True, prefill_shapes=kept)
    texts = [alone(first, short, 4), alone(first, long, 4)]
    shapes = [(1, MIN_PREFILL_WIDTH), (1, 2 * MIN_PREFILL_WIDTH)]
    assert json.loads(kept.read_text()) == [list(shape) for shape in shapes]

    second = scheduler(prefill_graphs=True, prefill_shapes=kept)
    assert second.warm_prefills() == 2 and second._prefills.shapes() == shapes
    assert [alone(second, short, 4), alone(second, long, 4)] == texts
    assert second._prefills.shapes() == shapes and json.loads(kept.read_text()) == [list(s) for s in shapes]

    kept.write_text("[[1, 32], [2")
    third = scheduler(prefill_graphs=True, prefill_shapes=kept)
    with caplog.at_level("WARNING", logger="jarvis.backends.hf.waves"):
        assert third.warm_prefills() == 0
    assert "do not read" in caplog.text and third._prefills is None
    assert alone(third, short, 4) == texts[0]

    kept.write_text(json.dumps([[1, 32], [8, 32], [1, 2048]]))  # rows past its batch (4), a width past its context
    fourth = scheduler(prefill_graphs=True, prefill_shapes=kept)
    assert fourth.warm_prefills() == 1 and fourth._prefills.shapes() == [(1, 32)]
