"""The wave scheduler of the transformers engine: many requests, one forward pass per step.

One scheduler thread owns the model. It waits for a request, gathers more for
a short window (up to the batch size), then decodes them together as a wave:
the prompts are left-padded into one prefill, and every step feeds the next
token of every row through one forward pass over the shared KV cache. Each
row has its own sampling settings, seed, adapter, stop sequences and token
limit; a row that finishes is answered at once and pruned from the cache, so
the wave shrinks as it goes. Requests that arrive during a "dynamic" wave
start the next one.

Two ways to decode a wave (`decode=`):
  * "dynamic": a growing KV cache, finished rows pruned at once; the default on CPU.
  * "static" / "graphs": one preallocated cache of the full batch's rows, finished rows carried
    along. With "graphs" (the default on CUDA) every step computes all the rows, one shape the
    compiler specialises, and the decode step is compiled once and replayed as a CUDA graph per
    window, captured by hand (step_graphs.py), which removes the per-kernel launch cost that
    dominates a small model's step and leaves no Python inside a step. Eager "static" steps compute
    only the first rows, the smallest power of two (from MIN_ROWS) that holds every busy row: there a
    step's cost follows its rows.
    (Compiled with a dynamic row count, a 64-row step took 5.6 ms and a 2-row one 2.6 ms on an H100,
    where earlier H100s had run the specialised 64-row step in 2.1-2.4 ms, for 1 busy row or 64: on
    a GPU the fixed shape is the cheaper one.) Adapters ride
    along as stacks indexed by each row's slot (stacked_lora.py: one device tensor per wave holds
    the slots), compiled into a graph of their own; adapters that do not stack (DoRA: PEFT's per-row
    routing) make the waves decode "dynamic".

With "graphs" a static wave runs a step ahead (`overlap`): it launches a step with the last one's
picks as its input, on the device, and only then takes that last step's tokens to the host and
detokenizes, checks and emits them, while the device computes (Launched, _settle). A row that
finishes this way has computed one step for nothing, which a step of all rows costs anyway. Joins
and shifts need every token seen, and rows whose logits are shaped by what they generated (a
grammar, penalties) need their last token before the next pick, so the wave steps one at a time
around them. (On an H100, 64 rows of the 270M model: 29,725 tok/s overlapped, 24,532 one at a time.)

A static wave takes requests while it runs: every row writes its next token to the same cache
slot `at`, so a waiting request is prefilled on its own and its KV copied into a free row just
left of `at` (the rows before it masked off, its positions its own), and it decodes from the
next step on. It joins when its prompt fits left of `at` and its answer in the cache; else the
rows all shift left as far as the longest one allows; if it still does not fit, it waits at the
head of the line and nobody overtakes it, so the wave drains until it fits or the next wave
starts with it. With "graphs" that prefill is a CUDA graph too, captured per padded shape
(PrefillGraphs). The requests waiting at a step join together, in one prefill; with
`join_seconds` (JARVIS_HF_JOIN_WAIT_MS) they are held a little while rows decode, so that one
prefill admits more of them (_holds). A wave's own first requests enter the same way, at `at` =
their longest prompt, so only their rows are prefilled, never the free rows. Every layer of the
static cache keeps the whole context, sliding-window ones too (the mask keeps their window): transformers'
sliding layers count the position in a Python int, and a replayed CUDA graph would be captured
again for each value of it.

A static step attends only a window of the cache: the smallest power of two (from MIN_WINDOW, at
most max_len) that holds the slots in use, not all max_len of them, so a step's attention costs
what the wave holds rather than what it could hold (a CUDA graph per window). When `at` would
cross into a larger window, the rows first shift left as far as the longest one allows, so a wave
that keeps taking requests keeps a small window instead of walking to the cache's end.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jarvis.backends.hf.sampling import adjusted_logits, sample_rows, samples, seq_logprob
from jarvis.backends.hf.stacked_lora import BASE
from jarvis.backends.hf.step_graphs import PrefillGraphs, StepGraphs, padded_rows, padded_width
from jarvis.engine import Emit, EngineStats, GenerationChunk, PreparedRequest, TokenLogprob, batched_emits
from jarvis.engine_rules import skips_leading_bos
from jarvis.text_stream import StopSequenceMatcher

log = logging.getLogger("jarvis.backends.hf.waves")

#: The smallest context window a static step attends (slots); windows double from here up to max_len.
MIN_WINDOW = 256
#: The fewest rows an eager static step computes; row counts double from here up to the batch size (first_rows).
#: Not 1: torch's compiler specialises a size of 1, so a compiled step would compile a one-row step of its own.
MIN_ROWS = 2


class IncrementalDetokenizer:
    """Token ids → text deltas that never split a character or drop a leading space, for a tokenizer that has no
    Rust backend (detokenizer() takes StreamDetokenizer where it can), and StreamDetokenizer's fallback.

    Decodes a small window (seeded with the prompt's last tokens) and emits what
    the newest token added, holding back while the text ends mid-character."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StreamDetokenizer:
    """IncrementalDetokenizer's deltas from the tokenizers library's own incremental decoder (`DecodeStream`, in
    Rust, seeded with the prompt's last tokens): one call per token where the window takes two decodes through
    transformers, 1.5 against 6.2 us a token on the embedded model, which a 64-row step pays 64 times. Where
    DecodeStream gives up on a token (its "Invalid prefix encountered", on some runs of byte tokens), the
    two-decode window takes over the rest of the answer, seeded with the tokens before it; at that token the
    answer may then lack a replacement character (U+FFFD) that the window alone would have shown."""

    __slots__ = ("_backend", "_stream", "_recent", "_window")

    def __init__(self, backend: Any, prompt_ids: list[int]) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(ids=list(prompt_ids[-4:]), skip_special_tokens=False)
        self._recent: collections.deque[int] = collections.deque(prompt_ids[-4:], maxlen=4)
        self._window: IncrementalDetokenizer | None = None

    def push(self, token: int) -> str:
        if self._window is not None:
            return self._window.push(token)
        try:
            piece = self._stream.step(self._backend, token)  # None: the token ends mid-character
        except Exception:  # noqa: BLE001 - "Invalid prefix encountered": a byte token broke the decoded prefix
            # (the embedded model's tokenizer does this on some runs of byte tokens); the window goes on from here
            self._window = IncrementalDetokenizer(self._backend, list(self._recent))
            return self._window.push(token)
        self._recent.append(token)
        return piece or ""


def detokenizer(tokenizer: Any, prompt_ids: list[int]) -> IncrementalDetokenizer | StreamDetokenizer:
    """The incremental detokenizer for a request: Rust's where the tokenizer has a Rust backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return IncrementalDetokenizer(tokenizer, prompt_ids) if backend is None else StreamDetokenizer(backend, prompt_ids)


@dataclass
class Sequence:
    request: PreparedRequest
    prompt_ids: list[int]
    emit: Emit
    cancel: threading.Event
    detok: IncrementalDetokenizer | StreamDetokenizer
    stops: StopSequenceMatcher
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)  # when it was submitted
    #: The row's grammar state when its output is constrained (model_tools.grammars.RowMatcher).
    matcher: Any = None

    @property
    def adapter(self) -> str:
        return self.request.adapter or BASE

    def __post_init__(self) -> None:
        r = self.request
        #: Whether the row's next token can be picked before the host has seen its last one: nothing shapes its
        #: logits from what it generated (a grammar, repetition, presence or frequency penalties).
        self.ahead = (self.matcher is None and r.repetition_penalty == 1.0
                      and not (r.presence_penalty or r.frequency_penalty))


@dataclass
class Launched:
    """A static step on its way: the rows it computes (and the request in each at its launch), its logits, the
    token picked for every row (on the device, the next step's input) and their copy to the host."""

    rows: list[tuple[int, Sequence]]
    logits: torch.Tensor
    picks: torch.Tensor
    host: torch.Tensor
    copied: Any = None  # a CUDA event recorded after the copy (None on a CPU: the copy is done)

    @classmethod
    def of(cls, rows: list[tuple[int, Sequence]], logits: torch.Tensor, picks: torch.Tensor) -> Launched:
        if not picks.is_cuda:
            return cls(rows, logits, picks, picks)
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
        host.copy_(picks, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(rows, logits, picks, host, copied)

    def tokens(self) -> list[int]:
        """The picks on the host: waits for their copy only, not for a step launched after it."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


@dataclass
class ModelHandle:
    """What the scheduler needs from the engine; `model` may be swapped (PEFT wrapping) under `lock`."""

    model: Any
    tokenizer: Any
    device: torch.device
    eos_ids: frozenset[int]
    #: Held by every forward pass. Reentrant (an RLock) where transformers' continuous batching shares the model:
    #: its passes take it through forward hooks, inside a wave's pass as well (continuous.ContinuousBatcher).
    lock: Any
    stats: EngineStats
    #: The loaded adapters stacked per layer (stacked_lora.StackedLora), or None: PEFT's own per-row routing.
    stacked: Any = None

    @property
    def has_adapters(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def static_ok(self) -> bool:
        """Whether a static (and graph) decode can serve the batch: no adapters, or adapters that stack (PEFT's
        own per-row routing is not graph-friendly)."""
        return not self.has_adapters or self.stacked is not None


@dataclass
class StaticWave:
    """A static wave: one row per slot of a preallocated cache, every row writing its next token to slot `at`."""

    requests: list[Sequence]  # every request the wave took: a failure answers them all
    slots: list[Sequence | None]  # the request decoding in each row; None: a free row
    feed: list[int]  # each row's next input token (a free row's is computed and dropped)
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    at: int
    #: Each row's adapter slot in `stacked` (stacked_lora.StackedLora), kept on the device; None without adapters.
    rows: torch.Tensor | None = None
    stacked: Any = None
    generation: int = 0  # `stacked.generation` when `rows` was computed

    def adapters(self) -> list[str]:
        return [seq.adapter if seq is not None else BASE for seq in self.slots]

    @staticmethod
    def history(seq: Sequence) -> int:
        """The cache slots `seq` fills: its prompt and its tokens fed so far (the newest is fed next)."""
        return len(seq.prompt_ids) + len(seq.generated) - 1


class BatchScheduler:
    def __init__(self, handle: ModelHandle, max_batch_size: int, gather_seconds: float,
                 decode: str = "dynamic", max_len: int = 4096, min_window: int = MIN_WINDOW,
                 join_seconds: float = 0.0, first_rows: bool | None = None, overlap: bool | None = None,
                 prefill_graphs: bool | None = None, prefill_shapes: Path | None = None) -> None:
        self.handle = handle
        #: A file that keeps the base model's prefill graph shapes (PrefillGraphs) across restarts: each new shape
        #: is written to it, and warm_prefills() captures them at the next start.
        self.prefill_shapes = prefill_shapes
        self._kept_shapes = 0  # how many of _prefills' shapes the file holds
        #: The prompts' forward passes of a static wave (its first requests, each join) replayed as CUDA graphs
        #: (PrefillGraphs); on by default with "graphs".
        self.prefill_graphs = decode == "graphs" if prefill_graphs is None else prefill_graphs
        #: A static wave launches a step before the host has read the last one's tokens (the next step's input
        #: is the picks, on the device) and emits them while the device computes: the host's share of a step
        #: (the picks' copy, each row's detokenizing and stop checks, the emits) runs beside the forward pass.
        #: On by default with CUDA graphs; a wave steps one at a time while a row's logits are shaped by what
        #: it generated (Sequence.ahead), and before a join or a shift.
        self.overlap = decode == "graphs" if overlap is None else overlap
        #: While a static wave decodes, how long waiting requests may be held back before they join, so that one
        #: prefill admits several (0: they join at the next step). See _holds.
        self.join_seconds = join_seconds
        #: A static step computes only the first rows that hold the busy ones (else all max_batch_size rows):
        #: eager "static" does by default, a compiled "graphs" step keeps the one shape.
        self.first_rows = decode == "static" if first_rows is None else first_rows
        self.min_window = min_window  # max_len: every static step attends the whole cache
        self.max_batch_size = max_batch_size
        self.gather_seconds = gather_seconds
        self.decode = decode
        self.max_len = max_len
        self._static: Any = None  # the whole_context_cache of max_batch_size rows, reused wave after wave
        self._decode_step: StepGraphs | None = None  # "graphs": the base model's step
        self._adapter_step: StepGraphs | None = None  # "graphs": the step of the model with its adapters stacked
        self._prefills: PrefillGraphs | None = None  # "graphs": the base model's prompts' forward pass
        self._adapter_prefills: PrefillGraphs | None = None  # "graphs": the same with the adapters stacked
        self._shared_generator: torch.Generator | None = None
        self._queue: queue.Queue[Sequence | None] = queue.Queue()
        #: Taken from the queue, not yet decoding: its head waits for room in the running wave, or starts the next.
        self._pending: collections.deque[Sequence | None] = collections.deque()
        self._thread = threading.Thread(target=self._run, name="hf-scheduler", daemon=True)
        self.waves = 0
        self.joined = 0  # requests that joined a static wave already decoding
        self.join_prefills = 0  # prefills that admitted them
        self.step_seconds = 0.0  # the last static step, from one join check to the next
        self.shifts = 0  # times a static wave moved its rows left to make room
        self.compiles = 0  # "graphs": decode steps compiled (the base model's, each stack's)
        self.row_steps: dict[int, int] = {}  # static steps by the rows they computed
        self.overlapped = 0  # static steps launched before the last one's tokens were taken (overlap)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def warm_up(self) -> float:
        """Run what a static wave runs once before any request waits for it, and return the seconds it took: in
        "graphs" mode that compiles the decode step twice, first in the first window, then past it, where
        torch's compiler makes the window a dynamic size; later windows only capture their CUDA graph (with
        first_rows, both sizes: first at MIN_ROWS rows, then at twice as many). The prefills of the shapes it
        runs are captured too (PrefillGraphs); other shapes are captured the first time a wave meets them, in a
        few tenths of a second each, or before that by warm_prefills(). Call it after start()."""
        started = time.monotonic()
        bos = self.handle.tokenizer.bos_token_id or 0
        short = min(8, self.max_len - 2)
        long = min(self.min_window + 8, self.max_len - 2)  # past the first window, where the room allows
        failed: list[BaseException] = []
        # with first_rows, one row more than MIN_ROWS makes the second step's rows the next count
        # (a join wait does not hold them back: they are as many as the one decoding row, or more)
        for prompts in ([short], [long - i for i in range(min(self.max_batch_size, MIN_ROWS + 1))]):
            done = [threading.Event() for _ in prompts]
            with self.handle.lock:  # the first one's prefill waits for it, so the others join before its step
                for length, finished in zip(prompts, done):
                    def emit(chunk: GenerationChunk | BaseException, finished: threading.Event = finished) -> None:
                        if isinstance(chunk, BaseException):
                            failed.append(chunk)
                        if isinstance(chunk, BaseException) or chunk.finish_reason:
                            finished.set()
                    request = PreparedRequest(prompt=None, model="warm-up", max_tokens=2, temperature=0.0,
                                              ignore_eos=True)
                    self.submit(request, [bos] * length, emit, threading.Event())
            for finished in done:
                finished.wait()
            if failed:
                raise failed[0]
        return time.monotonic() - started

    def warm_prefills(self) -> int:
        """Capture the prefill shapes the last run kept in `prefill_shapes`, so that no request waits for their
        capture (a few tenths of a second each, on first use): returns how many. 0 where the prefills run eager,
        adapters are loaded, or the file is missing; a file that does not read is skipped, with a warning; shapes
        past this scheduler's batch size or context are skipped (dropped from the file at its next write).
        Call it after start(), before the server takes requests."""
        if self.prefill_shapes is None or not self.prefill_shapes.is_file():
            return 0
        try:
            shapes = [(int(rows), int(width)) for rows, width in json.loads(self.prefill_shapes.read_text())]
        except (OSError, ValueError, TypeError) as e:
            log.warning("the prefill shapes in %s do not read (%s); none captured at start", self.prefill_shapes, e)
            return 0
        # what this scheduler can still meet (the last run's batch size or context may have been larger)
        rows, width = padded_rows(self.max_batch_size), padded_width(self.max_len)
        shapes = [(r, w) for r, w in shapes if r <= rows and w <= width]
        h = self.handle
        with h.lock:  # the scheduler thread prefills under it
            graphs = self._prefill_graphs()
            if graphs is None or graphs.stacked is not None:
                return 0
            return graphs.warm(shapes, h.device, h.tokenizer.bos_token_id or 0)

    def _keep_shapes(self, graphs: PrefillGraphs) -> None:
        """Write the base model's prefill shapes to `prefill_shapes` when a new one was added (rarely: a
        few dozen shapes at most, each once). A write that fails costs only the next start's warm-up."""
        if self.prefill_shapes is None or graphs is not self._prefills:
            return
        shapes = graphs.shapes()
        if len(shapes) == self._kept_shapes:
            return
        try:
            self.prefill_shapes.parent.mkdir(parents=True, exist_ok=True)
            written = self.prefill_shapes.with_suffix(".tmp")
            written.write_text(json.dumps([list(shape) for shape in shapes]))
            written.replace(self.prefill_shapes)
        except OSError as e:
            log.warning("could not keep the prefill shapes in %s: %s", self.prefill_shapes, e)
        self._kept_shapes = len(shapes)

    def submit(self, request: PreparedRequest, prompt_ids: list[int], emit: Emit,
               cancel: threading.Event) -> None:
        generator = None  # a seeded row's own draws; unseeded rows share the scheduler's generator
        if samples(request) and request.seed is not None:
            generator = torch.Generator(device=self.handle.device)
            generator.manual_seed(request.seed)
        matcher = request.compiled_constraint() if request.compiled_constraint is not None else None
        self._queue.put(Sequence(request, prompt_ids, emit, cancel,
                                 detokenizer(self.handle.tokenizer, prompt_ids),
                                 StopSequenceMatcher(request.stop), generator, matcher=matcher))

    # --- the scheduler thread ----------------------------------------------------------------------

    def _take(self, timeout: float | None) -> Sequence | None:
        """The next request: the pending ones first, then the queue (queue.Empty on timeout)."""
        if self._pending:
            return self._pending.popleft()
        return self._queue.get(timeout=timeout)

    def _run(self) -> None:
        while True:
            first = self._take(None)
            if first is None:
                return
            wave = [first]
            deadline = time.monotonic() + self.gather_seconds
            while len(wave) < self.max_batch_size:
                try:
                    item = self._take(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:  # stop after this wave
                    self._pending.appendleft(None)
                    break
                wave.append(item)
            self.waves += 1
            try:
                with torch.inference_mode():
                    self._decode_wave(wave)
            except BaseException as exc:  # a failed wave fails its requests, never the scheduler
                for seq in wave:
                    seq.emit(exc)

    def _forward(self, adapters: list[str] | None = None, **inputs: Any) -> Any:
        """One forward pass; `adapters` names each row's adapter (BASE: none) while adapters are loaded."""
        h = self.handle
        with h.lock:
            h.stats.forward_passes += 1
            if adapters is None or not h.has_adapters:
                return h.model(**inputs, use_cache=True)
            if h.stacked is None:
                return h.model(**inputs, use_cache=True, adapter_names=adapters)
            with h.stacked.use(adapters):
                return h.model(**inputs, use_cache=True)

    def _starting(self, arrivals: list[Sequence]) -> list[Sequence]:
        """The arrivals that need decoding: prompt scores go out first, the cancelled and the zero-token finish."""
        for seq in arrivals:
            if seq.request.echo and seq.request.logprobs:
                seq.emit(GenerationChunk(text="", prompt_logprobs=self._score_prompt(seq)))
        live = [s for s in arrivals if not s.cancel.is_set() and self._has_budget(s)]
        for seq in arrivals:
            if seq not in live:
                self._finish(seq, "cancelled" if seq.cancel.is_set() else "length")
        return live

    def _decode_wave(self, wave: list[Sequence]) -> None:
        from transformers import DynamicCache

        h = self.handle
        live = self._starting(wave)
        if not live:
            return
        width = max(len(s.prompt_ids) for s in live)
        longest = width + max(s.request.max_tokens or 0 for s in live)
        if self.decode != "dynamic" and h.static_ok and longest <= self.max_len:
            return self._decode_static(wave, live, width)
        ids, mask, positions = self._left_padded(live, width)
        cache = DynamicCache(config=h.model.config)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            logits_to_keep=1, adapters=[s.adapter for s in live])
        while True:
            logits = out.logits[:, -1, :].float()
            tokens = self._sample(logits, live)
            with batched_emits():
                keep = [i for i, (seq, token) in enumerate(zip(live, tokens))
                        if not self._advance(seq, token, logits, i)]
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=h.device)
                cache.batch_select_indices(index)
                mask, positions, tokens = mask[index], positions[index], [tokens[i] for i in keep]
                live = [live[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            out = self._forward(input_ids=torch.tensor(tokens, device=h.device).unsqueeze(-1),
                                attention_mask=mask, position_ids=positions, past_key_values=cache,
                                logits_to_keep=1, adapters=[s.adapter for s in live])

    def _decode_static(self, wave: list[Sequence], live: list[Sequence], width: int) -> None:
        h, size = self.handle, self.max_batch_size
        if self._static is None:
            self._static = whole_context_cache(h.model.config, self.max_len)
        cache = self._static
        # every row starts free, seeing one slot (an all-masked row would turn its garbage NaN); the wave's
        # requests are admitted as joiners are, ending at slot `width`: only their own rows are prefilled
        mask = torch.zeros((size, self.max_len), dtype=torch.long, device=h.device)
        mask[:, width - 1] = 1
        w = StaticWave(wave, [None] * size, [0] * size, cache, mask,
                       torch.zeros((size, 1), dtype=torch.long, device=h.device), at=width)
        for layer in cache.layers:  # a reused cache keeps its rows (the masks hide them); the next slot is `width`
            if layer.is_initialized:
                layer.cumulative_length.fill_(width)
        self._admit(w, live)
        flight: Launched | None = None  # the step launched last, its tokens not yet taken (overlap)
        last = None
        while True:
            now = time.monotonic()
            if last is not None:  # a step and what ran beside it: how long a request held now waits for the next
                self.step_seconds = now - last
            last = now
            if flight is not None and self._may_join(w):  # a join needs every token seen
                self._settle(w, flight)
                flight = None
            if flight is None:
                self._join(w)
            busy = [j for j, seq in enumerate(w.slots) if seq is not None]
            # with a step in flight, each row's token from it is not counted yet
            if not any(len(w.slots[j].generated) + (flight is not None)  # type: ignore[union-attr]
                       < (w.slots[j].request.max_tokens or 0) for j in busy):  # type: ignore[union-attr]
                if flight is None:
                    return
                self._settle(w, flight)
                flight = None
                continue
            if self._window(w.at + 1) > self._window(w.at):  # the step would attend a larger window
                if flight is not None:  # the shift keeps each row's history: every token seen first
                    self._settle(w, flight)
                    flight = None
                    continue
                self._shift(w, max(w.history(w.slots[j]) for j in busy))  # type: ignore[arg-type]
            mask[:, w.at] = 1
            w.positions += 1
            w.at += 1
            window = self._window(w.at)
            if window != cache.layers[0].window:
                set_window(cache, window)
            n = self._rows(busy[-1] + 1)  # the step computes rows [0, n): the cache's update writes only those
            # the next inputs: the step in flight's picks (rows only finish, none joins, while one is in flight)
            feed = flight.picks[:n] if flight is not None else torch.tensor(w.feed[:n], device=h.device)
            self.overlapped += flight is not None
            with h.lock:
                h.stats.forward_passes += 1
                logits = self._step(w, n, window, feed).float()
            self.row_steps[n] = self.row_steps.get(n, 0) + 1
            launched = Launched.of([(j, w.slots[j]) for j in busy], logits,  # type: ignore[misc]
                                   self._pick(logits, w.slots[:n]))
            if flight is not None:
                self._settle(w, flight)  # the host's share of the last step, while the device runs this one
            flight = launched
            if not self._ahead(w):  # rows only finish (and none joins) until this flight settles: it stays so
                self._settle(w, flight)
                flight = None

    def _may_join(self, w: StaticWave) -> bool:
        """Whether a request waits, is not held back, and a row is free for it (a full wave's waiting requests
        do not stop the overlap: the rows its step in flight frees are seen a step later)."""
        return self._waiting() and None in w.slots and not self._holds(w)

    def _ahead(self, w: StaticWave) -> bool:
        """Whether the wave may launch a step before it has taken the last one's tokens (overlap)."""
        return self.overlap and all(seq is None or seq.ahead for seq in w.slots)

    def _settle(self, w: StaticWave, step: Launched) -> None:
        """Take a launched step's tokens: each row that still holds the request it computed for advances
        (emitting), freeing its row when it finishes; its next input is the token (w.feed)."""
        tokens = step.tokens()
        with batched_emits():  # the rows' chunks reach the event loop in one call
            for j, seq in step.rows:
                if w.slots[j] is not seq:  # finished by the step before, with this one in flight
                    continue
                if self._advance(seq, tokens[j], step.logits, j):
                    w.slots[j] = None
                else:
                    w.feed[j] = tokens[j]

    def _rows(self, used: int) -> int:
        """The rows a static step computes to hold the first `used`: with first_rows the smallest power of two
        from MIN_ROWS, at most the batch size; else the batch size."""
        if not self.first_rows:
            return self.max_batch_size
        return min(self.max_batch_size, max(MIN_ROWS, 1 << (used - 1).bit_length()))

    def _step(self, w: StaticWave, n: int, window: int, feed: torch.Tensor) -> torch.Tensor:
        """The next-token logits of rows [0, n) of `w` (under the handle's lock), fed `feed` (n token ids, on the
        device), attending the cache's first `window` slots: eager, or replayed as a CUDA graph ("graphs")."""
        h = self.handle
        rows = self._adapter_rows(w)
        if self.decode == "graphs":
            return self._graphs().step(feed, w.mask, w.positions, window, rows)
        use = contextlib.nullcontext() if rows is None else h.stacked.use(rows[:n])
        with use:
            out = h.model(input_ids=feed.unsqueeze(-1), attention_mask=w.mask[:n, :window],
                          position_ids=w.positions[:n], past_key_values=w.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _adapter_rows(self, w: StaticWave) -> torch.Tensor | None:
        """Each row's slot in the adapters' stack (None: no adapters loaded). The slots live in one device
        tensor per wave, rewritten in place only when the rows' adapters change (a request joined, or a load or
        unload changed the stack); a finished row keeps its old slot, its output being dropped. An adapter
        unloaded while its row decodes fails the wave (KeyError)."""
        h = self.handle
        if not h.has_adapters:
            return None
        if h.stacked is None:  # an adapter that does not stack was loaded while the wave ran
            raise RuntimeError("an adapter kind that does not stack (e.g. DoRA) was loaded during a static decode")
        if w.rows is None or w.stacked is not h.stacked:
            w.rows, w.stacked = h.stacked.rows_of(w.adapters()), h.stacked
        elif w.generation != h.stacked.generation:
            w.rows.copy_(h.stacked.rows_of(w.adapters()))
        w.generation = h.stacked.generation
        return w.rows

    def _waiting(self) -> bool:
        """Whether a request waits: the head of `_pending`, filled from the queue without blocking."""
        if not self._pending:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return False
        return True

    def _fits(self, seq: Sequence, at: int) -> bool:
        """Whether `seq` can join a static wave at slot `at`: its prompt fits left of it, its answer in the cache
        (and its adapter, if any, is in the stack the wave runs with)."""
        h = self.handle
        return ((seq.adapter == BASE or (h.stacked is not None and seq.adapter in h.stacked.slots))
                and h.static_ok and len(seq.prompt_ids) <= at and at + (seq.request.max_tokens or 0) <= self.max_len)

    def _window(self, slots: int) -> int:
        """The context a static step attends to see `slots` slots: the smallest power of two from `min_window`
        that holds them, at most max_len."""
        return min(self.max_len, max(self.min_window, 1 << (slots - 1).bit_length()))

    def _make_room(self, seq: Sequence, w: StaticWave) -> bool:
        """Shift every row of `w` left, as far as its longest row and `seq`'s prompt allow, if `seq` then fits."""
        target = max([len(seq.prompt_ids)] + [w.history(s) for s in w.slots if s is not None])
        if not (target < w.at and self._fits(seq, target)):
            return False
        self._shift(w, target)
        return True

    def _shift(self, w: StaticWave, kept: int) -> None:
        """Move every row of `w` left so that its last `kept` slots become its first (no-op if none would move).

        The positions stay, and the rows keep their order in the cache, so no row's attention changes."""
        k = w.at - kept
        if k <= 0:
            return
        for layer in w.cache.layers:
            layer.keys[:, :, :kept] = layer.keys[:, :, k:w.at].clone()
            layer.values[:, :, :kept] = layer.values[:, :, k:w.at].clone()
            layer.cumulative_length.sub_(k)  # in place: a CUDA graph reads it from its address
        w.mask[:, :kept] = w.mask[:, k:w.at].clone()
        w.mask[:, kept:] = 0
        w.mask[:, kept - 1] = 1  # a free row sees at least one slot: an all-masked row would turn its garbage NaN
        w.at = kept
        self.shifts += 1

    def _join(self, w: StaticWave) -> None:
        """Waiting requests take the free rows of the running static wave, oldest first (_admit). A request that
        does not fit stays at the head of the line: nobody overtakes it, so the wave drains until it fits or the
        next wave starts with it."""
        if not self._waiting() or self._holds(w):  # the common step: nobody waits
            return
        free = sum(seq is None for seq in w.slots)
        arrivals: list[Sequence] = []
        while len(arrivals) < free and self._waiting():
            seq = self._pending[0]
            if seq is None or not (self._fits(seq, w.at) or (not arrivals and self._make_room(seq, w))):
                break  # stopping, or the head waits for room
            arrivals.append(self._pending.popleft())  # type: ignore[arg-type]
        if not arrivals:
            return
        w.requests.extend(arrivals)
        live = self._starting(arrivals)
        if live:
            self.joined += len(live)
            self.join_prefills += 1
            self._admit(w, live)

    def _holds(self, w: StaticWave) -> bool:
        """Whether the waiting requests wait one more step (join_seconds): while the oldest would still have
        waited less than join_seconds at the end of it (a step as long as the last one), and fewer wait than
        there are rows decoding. A join's prefill runs between two steps, holding up every decoding row, and
        costs about the same for one prompt as for several (eager, its kernels are launched one by one): one
        prefill for several saves the decoding rows' time, paid by the waiting ones' first token, which pays
        only while those rows outnumber them.

        Free rows do not end the hold: in a full wave rows free one at a time, each one's replacement arrives
        alone, and admitting it at once would run a prefill per request; held, the rows that free meanwhile
        are taken by one prefill (a row idles a few steps, every decoding row is spared the prefills)."""
        head = self._pending[0]
        if (not self.join_seconds or head is None
                or time.monotonic() - head.arrived + self.step_seconds >= self.join_seconds):
            return False
        decoding = sum(seq is not None for seq in w.slots)
        return len(self._pending) + self._queue.qsize() < decoding

    def _admit(self, w: StaticWave, live: list[Sequence]) -> None:
        """Put `live` into free rows of `w`, their first token sampled: the wave's own requests and joiners alike.

        They are prefilled together on a small dynamic cache (_prefill), and each one's keys and values are
        copied into its row, ending just before `at`: one copy per layer for all of them, left padding included
        (the row's mask shows only its prompt, and its positions restart from its own). A dynamic sliding-window
        layer keeps only the window's last tokens: the ones before them are out of every later query's window,
        so the row's older slots there go unread."""
        h, width, at = self.handle, max(len(s.prompt_ids) for s in live), w.at
        logits, parts = self._prefill(live, width)
        rows = [j for j, seq in enumerate(w.slots) if seq is None][: len(live)]
        index = torch.tensor(rows, device=h.device)
        for layer, (keys, values) in zip(w.cache.layers, parts):
            if not layer.is_initialized:
                allocate(layer, len(w.slots), keys, values, at)
            kept = min(keys.shape[-2], width)  # a prefill graph's width may pad the prompts further left
            layer.keys[index, :, at - kept:at] = keys[:, :, -kept:]
            layer.values[index, :, at - kept:at] = values[:, :, -kept:]
        lengths = torch.tensor([len(s.prompt_ids) for s in live], device=h.device)
        slots = torch.arange(self.max_len, device=h.device)
        w.mask[index] = ((slots >= at - lengths[:, None]) & (slots < at)).long()
        w.positions[index] = (lengths - 1)[:, None]
        logits = logits.float()
        with batched_emits():
            for r, (seq, j, token) in enumerate(zip(live, rows, self._sample(logits, live))):
                if not self._advance(seq, token, logits, r):
                    w.slots[j], w.feed[j] = seq, token
                    if w.rows is not None and w.stacked is self.handle.stacked:
                        w.rows[j] = w.stacked.slots[seq.adapter]

    def _prefill(self, live: list[Sequence], width: int
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The forward pass of `live`'s prompts, left-padded to `width`, on a dynamic cache of their own: the last
        position's logits and each layer's keys and values (their last slots hold the prompts). Replayed as a CUDA
        graph ("graphs", PrefillGraphs) where its shape has one, else eager."""
        from transformers import DynamicCache

        h = self.handle
        ids, mask, positions = self._left_padded(live, width)
        adapters = [s.adapter for s in live]
        graphs = self._prefill_graphs()
        if graphs is not None:
            with h.lock:
                rows = h.stacked.rows_of(adapters) if graphs.stacked is not None else None
                done = graphs.prefill(ids, mask, positions, rows)
                self._keep_shapes(graphs)
                if done is not None:
                    h.stats.forward_passes += 1
                    return done
        cache = DynamicCache(config=h.model.config)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            logits_to_keep=1, adapters=adapters)
        return out.logits[:, -1, :], [(layer.keys, layer.values) for layer in cache.layers]

    def _prefill_graphs(self) -> PrefillGraphs | None:
        """The prefills' CUDA graphs (step_graphs.py) of the base model, or of the model with its adapters stacked
        (a new stack, new graphs); None where the prefill runs eager: without prefill_graphs, and with adapters
        that do not stack."""
        h = self.handle
        if not self.prefill_graphs:
            return None
        if not h.has_adapters:
            if self._prefills is None:
                self._prefills = PrefillGraphs(h.model.forward, h.model.config, next(h.model.parameters()).dtype)
            return self._prefills
        if h.stacked is None:
            return None
        if self._adapter_prefills is None or self._adapter_prefills.stacked is not h.stacked:
            dtype = next(h.model.parameters()).dtype
            self._adapter_prefills = PrefillGraphs(h.model.get_base_model().forward, h.model.config, dtype,
                                                   stacked=h.stacked, base_slot=h.stacked.slots[BASE])
        return self._adapter_prefills

    def _left_padded(self, rows: list[Sequence], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt ids left-padded to `width`, the attention mask that hides the padding, and each row's positions
        (counted from its first real token)."""
        h = self.handle
        pad = h.tokenizer.pad_token_id if h.tokenizer.pad_token_id is not None else 0
        gaps = [width - len(s.prompt_ids) for s in rows]
        ids = torch.tensor([[pad] * g + s.prompt_ids for g, s in zip(gaps, rows)], device=h.device)
        mask = torch.tensor([[0] * g + [1] * (width - g) for g in gaps], device=h.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _graphs(self) -> StepGraphs:
        """The "graphs" decode step: compiled, and captured as CUDA graphs (step_graphs.py), one StepGraphs for
        the base model and one for the model with its adapters stacked (their hooks compiled in). A load or an
        unload that fits the stack changes its slots in place (stacked_lora.py), so those graphs stay valid, and
        nothing is compiled again (checked on a GPU: the same tokens as eager after a load and an unload). A new
        stack needs the step compiled again, and torch's compiler does not guard forward hooks
        (`skip_nnmodule_hook_guards`): a step compiled for the old stack would run its hooks. So all compiled
        code is dropped first (`torch._dynamo.reset()`), the base step's too."""
        h = self.handle
        if not h.has_adapters:
            if self._decode_step is None:
                self._decode_step = StepGraphs(self._compiled(h.model.forward), self._static)
                self.compiles += 1
            return self._decode_step
        if self._adapter_step is None or self._adapter_step.stacked is not h.stacked:
            if self._adapter_step is not None:
                self._adapter_step = self._decode_step = None
                torch._dynamo.reset()
            # the model under PEFT's wrapper: PeftModel.forward reads the active adapter, which a load or an
            # unload may change, and a changed guard is a compile; with PEFT's layers off the rest reads nothing
            # that a load changes
            inner = h.model.get_base_model()
            self._adapter_step = StepGraphs(self._compiled(inner.forward), self._static, stacked=h.stacked)
            self.compiles += 1
        return self._adapter_step

    def _compiled(self, forward: Any) -> Any:
        """`forward` compiled by torch's compiler (inductor's fused kernels; the CUDA graphs are StepGraphs')."""
        return torch.compile(forward, fullgraph=True)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far by the steps in use (a shape each)."""
        return sum(g.captures for g in (self._decode_step, self._adapter_step) if g is not None)

    @property
    def prefill_captures(self) -> int:
        """CUDA graphs captured so far by the prefills in use (a shape each)."""
        return sum(g.captures for g in (self._prefills, self._adapter_prefills) if g is not None)

    def _has_budget(self, seq: Sequence) -> bool:
        return (seq.request.max_tokens or 0) > 0

    # --- per row -------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, live: list[Sequence]) -> list[int]:
        """One token per row, with one device→host copy for the whole wave."""
        return self._pick(logits, live).tolist()

    def _pick(self, logits: torch.Tensor, rows: list[Sequence] | list[Sequence | None]) -> torch.Tensor:
        """One token per row of `logits`, on the device (a None row, a free one, takes its argmax).

        Greedy rows take the argmax; rows that sample with no seed are drawn together (one softmax, one
        multinomial over the batch, from the scheduler's generator); a seeded row draws from its own
        generator, so its text depends on its seed alone, never on the rows beside it."""
        work = logits
        for i, seq in enumerate(rows):
            shaped = None if seq is None else adjusted_logits(logits, i, seq)
            if shaped is not None:
                if work is logits:
                    work = logits.clone()  # the caller's logits stay unshaped: they give the logprobs
                work[i] = shaped
        picks = work.argmax(-1)
        drawn = [(i, seq) for i, seq in enumerate(rows) if seq is not None and samples(seq.request)]
        shared = [(i, seq.request) for i, seq in drawn if seq.generator is None]
        if shared:
            index = torch.tensor([i for i, _ in shared], device=work.device)
            draws = sample_rows(work[index], [request for _, request in shared], self._generator())
            picks = picks.index_copy(0, index, draws)
        for i, seq in drawn:
            if seq.generator is not None:
                picks[i] = sample_rows(work[i:i + 1], [seq.request], seq.generator)[0]
        return picks

    def _generator(self) -> torch.Generator:
        if self._shared_generator is None:
            self._shared_generator = torch.Generator(device=self.handle.device)
            self._shared_generator.manual_seed(random.getrandbits(63))
        return self._shared_generator

    def _advance(self, seq: Sequence, token: int, logits: torch.Tensor, row: int) -> bool:
        """Take `token` for `seq` (row `row` of `logits`, read only for logprobs); emit what it shows; True when the
        sequence is finished."""
        h, r = self.handle, seq.request
        if seq.cancel.is_set():
            return self._finish(seq, "cancelled")
        if seq.matcher is not None:
            seq.matcher.accept(token)
        if token in h.eos_ids and not r.ignore_eos:
            return self._finish(seq, "stop")
        seq.generated.append(token)
        piece = seq.detok.push(token)
        text = seq.stops.feed(piece)
        logprobs = [seq_logprob(h.tokenizer, logits[row], token, piece, r.top_logprobs)] if r.logprobs else []
        seq.emit(GenerationChunk(text=text, token_count=1, logprobs=logprobs))  # held-back text too: one per token
        if seq.stops.stopped:
            return self._finish(seq, "stop")
        if len(seq.generated) >= (r.max_tokens or 0):
            return self._finish(seq, "length")
        return False

    def _finish(self, seq: Sequence, reason: str) -> bool:
        tail = "" if seq.stops.stopped else seq.stops.flush()
        seq.emit(GenerationChunk(text=tail, finish_reason=reason, prompt_tokens=len(seq.prompt_ids),  # type: ignore[arg-type]
                                 completion_tokens=len(seq.generated), stop_sequence=seq.stops.matched))
        return True

    def _score_prompt(self, seq: Sequence) -> list[TokenLogprob]:
        """Logprob of each prompt token given the ones before it (the BOS is context, not scored)."""
        h = self.handle
        ids = torch.tensor([seq.prompt_ids], device=h.device)
        logits = self._forward(input_ids=ids, logits_to_keep=0, adapters=[seq.adapter]).logits[0].float()
        entries = []
        if seq.prompt_ids and not skips_leading_bos(seq.prompt_ids, h.tokenizer.bos_token_id, seq.request.score_bos):
            first = h.tokenizer.decode(seq.prompt_ids[:1])
            entries.append(TokenLogprob(token=first, logprob=None, bytes=list(first.encode()),
                                        token_id=int(seq.prompt_ids[0])))
        detok = detokenizer(h.tokenizer, seq.prompt_ids[:1])
        for pos in range(1, len(seq.prompt_ids)):
            token = seq.prompt_ids[pos]
            entries.append(seq_logprob(h.tokenizer, logits[pos - 1], token, detok.push(token),
                                       seq.request.top_logprobs))
        return entries


def whole_context_cache(config: Any, max_len: int) -> Any:
    """A static cache of `max_len` slots in every layer, the model's sliding-window layers included, each layer
    showing the attention only its first `window` slots (set_window)."""
    from transformers.cache_utils import Cache

    layer = _windowed_layer()
    return Cache(layers=[layer(max_cache_len=max_len) for _ in range(config.get_text_config().num_hidden_layers)])


def allocate(layer: Any, batch: int, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
    """Allocate a static layer's cache for `batch` rows like `keys` and `values` (heads, head size, dtype,
    device), its next slot `length` (the slots before it are about to be filled by a copy)."""
    layer.lazy_initialization(keys[:1].expand(batch, *keys.shape[1:]), values[:1].expand(batch, *values.shape[1:]))
    layer.cumulative_length.fill_(length)


def set_window(cache: Any, window: int) -> None:
    """Make every layer of a whole_context_cache give the attention (and the mask) its first `window` slots."""
    for layer in cache.layers:
        layer.window = window


@functools.cache
def _windowed_layer() -> type:
    """transformers' StaticLayer whose keys and values (and mask size) stop at `window` slots and at the step's
    rows. A compiled step is specialised to the window and rows it saw (a CUDA graph per window and row count;
    torch's compiler makes them dynamic sizes at the second), and every update still writes into the whole
    preallocated cache."""
    from transformers.cache_utils import StaticLayer

    class WindowedLayer(StaticLayer):  # type: ignore[misc]
        def __init__(self, max_cache_len: int, **kwargs: Any) -> None:
            super().__init__(max_cache_len=max_cache_len, **kwargs)
            self.window = max_cache_len

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            """StaticLayer.update for the step's rows, the cache's first ones (a step computes fewer rows than
            the cache holds): the new slots written in place, the window's keys and values returned."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            rows, length = key_states.shape[0], key_states.shape[-2]
            slots = torch.arange(length, device=self.device) + self.cumulative_length
            self.cumulative_length.add_(length)  # in place: a CUDA graph reads it from its address
            keys, values = self.keys[:rows], self.values[:rows]
            keys.index_copy_(2, slots, key_states)
            values.index_copy_(2, slots, value_states)
            return keys[:, :, :self.window], values[:, :, :self.window]

        def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
            return self.window, 0

    return WindowedLayer
