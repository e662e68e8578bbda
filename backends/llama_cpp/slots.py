"""Several requests decoded in one llama.cpp batch: one context, one sequence per slot.

The llama.cpp engine keeps `JARVIS_LLAMA_N_PARALLEL` slots, the sequences of one context (its KV cache
holds `n_seq_max` sequences of `max_model_len` tokens each), decoded together by one worker thread. Each
step puts every running sequence's last sampled token, and as much of the prompts being read as fits
`n_batch`, into one `llama_decode`; then each sequence samples its next token from its own row of logits
with its own sampler chain. A CPU decode step is bound by reading the weights, so four sequences cost
little more than one; llama.cpp's own server works the same way. A new prompt is read in chunks between
the running sequences' steps, so their tokens keep flowing while it is read.

- A finished sequence's cache stays in its slot. A later prompt from the same client (API key) that
  continues it (the next turn of a chat) takes that slot and decodes only the rest; another key's request
  never does, so the time to its first token tells it nothing about what others asked.
- One context carries one set of LoRA weights, so requests for different adapters take turns: a request
  for another adapter waits until the running ones finish, and the ones behind it wait too (first come,
  first served).
- Cancellation (the client went away) ends a sequence at its next step; a request still waiting for a
  slot is dropped when its turn comes.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.engine import Emit, FinishReason, GenerationChunk, PreparedRequest, TokenLogprob
from jarvis.engine_rules import skips_leading_bos
from jarvis.errors import NotFound
from jarvis.text_stream import StopSequenceMatcher, TokenTextDecoder

log = logging.getLogger("jarvis.backends.llama_cpp.slots")

#: Sampled tokens the repetition penalties look back over (llama-cpp-python's `last_n_tokens_size`).
PENALTY_LAST_N = 64
#: Prompt tokens scored per step for echo with logprobs (their logits rows: 64 × vocabulary floats).
PROMPT_SCORING_CHUNK = 64
#: Tokens a llama.cpp micro-batch holds at most (llama-cpp-python's and llama-server's `n_ubatch`).
MAX_UBATCH = 512


#: ggml's log levels (ggml.h) → Python's; CONT (5) continues the previous message.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_native_log = logging.getLogger("jarvis.backends.llama_cpp.native")
_log_callback: Any = None  # kept referenced: llama.cpp holds the pointer


def route_native_logs() -> None:
    """Send llama.cpp's own messages to Python logging at their level. llama-cpp-python's callback reads
    ggml's levels off by one, so a quiet `Llama(verbose=False)` still prints llama.cpp's warnings and
    info lines to stderr."""
    global _log_callback
    import llama_cpp

    if _log_callback is not None:
        return
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data: Any) -> None:
        last[0] = _LOG_LEVELS.get(level, last[0]) if level != 5 else last[0]
        if _native_log.isEnabledFor(last[0]):
            _native_log.log(last[0], "%s", text.decode(errors="replace").rstrip())

    _log_callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


class SamplerChain:
    """A request's llama.cpp sampler chain, in llama-cpp-python's order: logit bias, repetition penalties,
    then greedy (temperature 0) or top-k → top-p → min-p → temperature → a seeded draw."""

    def __init__(self, req: PreparedRequest, n_vocab: int, seed: int) -> None:
        import llama_cpp

        self.sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(stage: Any) -> None:
            llama_cpp.llama_sampler_chain_add(self.sampler, stage)

        if req.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(req.logit_bias))(
                *(llama_cpp.llama_logit_bias(int(token), float(bias)) for token, bias in req.logit_bias.items()))
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(req.logit_bias), biases))
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, req.repetition_penalty,
                                                   req.frequency_penalty, req.presence_penalty))
        if req.temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(req.top_k))
            add(llama_cpp.llama_sampler_init_top_p(req.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(req.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(req.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token from row `idx` of the context's logits, accepted into the chain's history."""
        import llama_cpp

        return int(llama_cpp.llama_sampler_sample(self.sampler, ctx, idx))

    def accept(self, token: int) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_accept(self.sampler, token)

    def reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_reset(self.sampler)

    def close(self) -> None:
        import llama_cpp

        if self.sampler:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None


def make_sampler(req: PreparedRequest, vocab: Any, n_vocab: int, seed: int) -> Any:
    """The request's sampler: its chain, checked against its grammar first when it has one
    (`grammar.GrammarCheckedSampler`)."""
    from jarvis.backends.llama_cpp.grammar import GrammarCheckedSampler

    chain = SamplerChain(req, n_vocab, seed)
    if req.compiled_constraint is None:
        return chain
    return GrammarCheckedSampler(chain, vocab, req.compiled_constraint, n_vocab,
                                 greedy=req.temperature == 0.0, seed=seed)


def logprob_entry(logits: np.ndarray, token: int, text: str, top_n: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """`token`'s log-probability under `logits`, with the `top_n` most likely tokens."""
    shifted = logits - logits.max()
    logsumexp = float(np.log(np.exp(shifted, dtype=np.float64).sum()))
    top: list[tuple[str, float]] = []
    if top_n:
        best = np.argpartition(-shifted, top_n)[:top_n]
        best = best[np.argsort(-shifted[best])]
        top = [(piece(int(t)).decode(errors="replace"), float(shifted[t]) - logsumexp) for t in best]
    return TokenLogprob(token=text, logprob=float(shifted[token]) - logsumexp, bytes=list(text.encode()), top=top,
                        token_id=int(token))


@dataclass(eq=False)
class Job:
    """One request's generation, from the moment it is submitted until its last chunk."""

    req: PreparedRequest
    ids: list[int]
    seed: int
    limit: int  # tokens it may generate
    emit: Emit
    cancel: threading.Event
    sampler: Any = None
    fed: int = 0  # prompt tokens in the slot's cache
    next_token: int | None = None  # sampled, to be decoded at the next step
    count: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None  # echo with logprobs: the prompt's scores so far
    decoder: TokenTextDecoder = field(default_factory=TokenTextDecoder)
    stops: StopSequenceMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopSequenceMatcher(self.req.stop)

    @property
    def scores_prompt(self) -> bool:
        return bool(self.req.echo and self.req.logprobs)


@dataclass(eq=False)
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # the tokens whose keys and values this sequence holds
    job: Job | None = None
    owner: str | None = None  # who asked for what `cached` holds (RequestContext.client)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotDecoder:
    """One llama.cpp context whose `n_slots` sequences are decoded together on one worker thread."""

    def __init__(self, path: Path, *, n_slots: int, n_ctx: int, n_batch: int, threads: int,
                 n_gpu_layers: int, bos: int, prefix_cache: bool = True) -> None:
        self.path, self.n_slots, self.n_ctx, self.threads = path, n_slots, n_ctx, threads
        self.n_gpu_layers, self.bos, self.prefix_cache = n_gpu_layers, bos, prefix_cache
        # Every running sequence adds a token to a step, so a batch holds at least one per slot.
        self.capacity = max(n_batch, n_slots)
        self.slots = [Slot(seq) for seq in range(n_slots)]
        self.model: Any = None
        self.ctx: Any = None
        self.vocab: Any = None
        self.n_vocab = 0
        self._batch: Any = None
        self._pieces: dict[int, bytes] = {}
        self._pending: deque[Job] = deque()
        self._wake = threading.Event()
        #: Held for each step; adapter changes take it between steps.
        self.lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.adapters: dict[str, Any] = {}  # name → llama.cpp adapter handle
        self.retiring: set[str] = set()  # adapters being unloaded: requests still waiting for them are refused
        self.applied: str | None = None  # the adapter the context runs with (None: the base model)
        self.steps = 0  # llama_decode calls
        self.prompt_tokens_decoded = 0  # prompt tokens not found in a slot's cache

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        import llama_cpp

        route_native_logs()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if self.n_gpu_layers == -1 else self.n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * self.n_slots  # each sequence its own n_ctx (kv_unified off)
        cparams.n_seq_max = self.n_slots
        cparams.kv_unified = False
        cparams.n_batch = self.capacity
        cparams.n_ubatch = min(self.capacity, MAX_UBATCH)
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama-cpp-python's default
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise RuntimeError(f"llama.cpp could not make a context of {self.n_slots} × {self.n_ctx} tokens")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self._thread = threading.Thread(target=self._run, name="llama-slots", daemon=True)
        self._thread.start()

    def close(self) -> None:
        import llama_cpp

        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for job in self._pending:
            job.emit(RuntimeError("the engine stopped"))
        self._pending.clear()
        for handle in self.adapters.values():
            llama_cpp.llama_adapter_lora_free(handle)
        self.adapters.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    def submit(self, job: Job) -> None:
        """Queue `job` (any thread); its chunks reach `job.emit`."""
        self._pending.append(job)
        self._wake.set()

    def uses(self, adapter: str) -> bool:
        return any(slot.job is not None and slot.job.req.adapter == adapter for slot in self.slots)

    # --- adapters (called with `lock` held) --------------------------------------------------------

    def apply(self, name: str | None) -> None:
        """Run the context with `name`'s LoRA (or none). Every cached sequence belonged to the old weights."""
        import llama_cpp

        if name == self.applied:
            return
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            if name not in self.adapters:
                raise NotFound(f"The lora adapter '{name}' was unloaded.", param="model", code="adapter_not_found")
            rc = llama_cpp.llama_set_adapters_lora(
                self.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[name]), 1,
                (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not apply adapter {name!r} (code {rc})")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        for slot in self.slots:
            slot.cached = []
        self.applied = name

    # --- the worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._closing:
                break
            if not self._pending and not self.running:
                self._wake.wait()
                continue
            with self.lock:
                try:
                    self._admit()
                    if self.running:
                        self._step()
                except BaseException as exc:  # a failed decode: every running request hears of it
                    log.exception("llama.cpp step failed")
                    self._fail_all(exc)
        for slot in self.slots:
            if slot.job is not None:
                self._end(slot, exc=RuntimeError("the engine stopped"))

    def _admit(self) -> None:
        """Move waiting jobs into free slots, first come first served."""
        while self._pending:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return
            job = self._pending[0]
            if job.cancel.is_set():
                self._pending.popleft()
                continue
            if job.req.adapter in self.retiring:  # its adapter is being unloaded: the running ones finish, no more
                self._pending.popleft()
                job.emit(NotFound(f"The lora adapter '{job.req.adapter}' was unloaded.", param="model",
                                  code="adapter_not_found"))
                continue
            if job.req.adapter != self.applied:
                if self.running:
                    return  # its adapter's turn comes when the running requests are done
                try:
                    self.apply(job.req.adapter)
                except Exception as exc:
                    self._pending.popleft()
                    job.emit(exc)
                    continue
            self._pending.popleft()
            try:
                self._place(job, free)
            except BaseException as exc:
                job.emit(exc)

    def _place(self, job: Job, free: list[Slot]) -> None:
        """Give `job` a free slot: the one whose whole cache its prompt continues (a chat's next turn: the
        earlier prompt and output, then the new message), which then decodes only the rest; else the slot
        with the least cached. Only a whole cache is reused, never a part of one: a part was computed in
        another batch shape than a fresh prefill of this prompt, so the same request sent twice would
        not decode the same greedy text (near-ties break differently)."""
        import llama_cpp

        if not job.ids:
            raise ValueError("the prompt has no tokens")

        def continued(slot: Slot) -> int:
            if not slot.cached or slot.owner != job.req.context.client:  # one key's cache never serves another
                return 0
            return len(slot.cached) if common_prefix(slot.cached, job.ids) == len(slot.cached) else 0

        slot = max(free, key=lambda s: (continued(s), -len(s.cached)))
        reuse = 0
        if self.prefix_cache and not job.scores_prompt:
            reuse = min(continued(slot), len(job.ids) - 1)  # the last prompt token is decoded for its logits
        memory = llama_cpp.llama_get_memory(self.ctx)
        if reuse == 0 or not llama_cpp.llama_memory_seq_rm(memory, slot.seq, reuse, -1):
            reuse = 0
            llama_cpp.llama_memory_seq_rm(memory, slot.seq, -1, -1)
        slot.cached, slot.owner = slot.cached[:reuse], job.req.context.client
        job.fed = reuse
        if job.scores_prompt:
            job.prompt_logprobs = []
            if not skips_leading_bos(job.ids, self.bos, job.req.score_bos):
                first = self.piece(job.ids[0]).decode(errors="replace")
                job.prompt_logprobs.append(TokenLogprob(token=first, logprob=None, bytes=list(first.encode()),
                                                        token_id=int(job.ids[0])))
        elif job.limit <= 0:
            slot.job = job
            self._end(slot, "length")
            return
        job.sampler = make_sampler(job.req, self.vocab, self.n_vocab, job.seed)
        slot.job = job

    def _step(self) -> None:
        """One llama_decode over every running sequence, then a token sampled for each that is due one."""
        import llama_cpp

        batch, n = self._batch, 0
        due: list[tuple[Slot, int]] = []  # (slot, batch row of the logits it samples from)
        fed: list[tuple[Slot, list[int], int]] = []  # (slot, tokens, first batch row) decoded this step

        def put(slot: Slot, tokens: list[int], *, every: bool, last: bool) -> None:
            """Add `tokens` after the slot's cache; logits for every one of them, or for the last one."""
            nonlocal n
            start, pos = n, len(slot.cached)
            for k, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos + k, 1
                batch.seq_id[n][0], batch.logits[n] = slot.seq, every or (last and k == len(tokens) - 1)
                n += 1
            fed.append((slot, tokens, start))

        running = [slot for slot in self.slots if slot.job is not None]
        for slot in running:
            job = slot.job
            assert job is not None
            if job.next_token is not None:
                put(slot, [job.next_token], every=True, last=True)
                due.append((slot, n - 1))
        for slot in running:
            job = slot.job
            assert job is not None
            if job.fed < len(job.ids) and n < self.capacity:
                room = self.capacity - n
                if job.scores_prompt:  # every row's logits are kept: a few at a time
                    room = min(room, PROMPT_SCORING_CHUNK)
                chunk = job.ids[job.fed: job.fed + room]
                last = job.fed + len(chunk) == len(job.ids)
                put(slot, chunk, every=job.scores_prompt, last=last)
                if last:
                    due.append((slot, n - 1))
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc})")
        self.steps += 1
        for slot, tokens, start in fed:
            job = slot.job
            assert job is not None
            if job.fed == len(job.ids):  # its sampled token
                job.next_token = None
            else:  # a chunk of its prompt
                if job.prompt_logprobs is not None:
                    self._score(job, tokens, start)
                job.fed += len(tokens)
                self.prompt_tokens_decoded += len(tokens)
            slot.cached.extend(tokens)
        for slot, row in due:
            try:
                self._sample(slot, row)
            except BaseException as exc:  # this request's sampler failed: only it ends
                self._end(slot, exc=exc)

    def _score(self, job: Job, tokens: list[int], start: int) -> None:
        """Logprobs of the prompt tokens that follow the ones just decoded (echo with logprobs)."""
        assert job.prompt_logprobs is not None
        for k in range(len(tokens)):
            nxt = job.fed + k + 1
            if nxt < len(job.ids):
                text = self.piece(job.ids[nxt]).decode(errors="replace")
                job.prompt_logprobs.append(logprob_entry(self.logits(start + k), job.ids[nxt], text,
                                                         job.req.top_logprobs, self.piece))

    def _sample(self, slot: Slot, row: int) -> None:
        import llama_cpp

        job = slot.job
        assert job is not None
        req = job.req
        if job.prompt_logprobs is not None:
            job.emit(GenerationChunk(text="", prompt_logprobs=job.prompt_logprobs))
            job.prompt_logprobs = None
        if job.count >= job.limit:
            return self._end(slot, "length")
        if job.cancel.is_set():
            return self._end(slot, "cancelled")
        token = job.sampler.sample(self.ctx, row)
        if not req.ignore_eos and llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._end(slot, "stop")
        job.count += 1
        piece = self.piece(token)
        logprobs = [logprob_entry(self.logits(row), token, piece.decode(errors="replace"), req.top_logprobs,
                                  self.piece)] if req.logprobs else []
        text = job.stops.feed(job.decoder.feed(piece))
        job.emit(GenerationChunk(text=text, token_count=1, logprobs=logprobs))  # held-back text too: one per token
        if job.stops.stopped:
            return self._end(slot, "stop")
        if job.count >= job.limit:
            return self._end(slot, "length")
        job.next_token = token

    def _end(self, slot: Slot, reason: FinishReason | None = None, *, exc: BaseException | None = None) -> None:
        """The slot's job is done: its last chunk (or its error) goes out and the slot is free again."""
        job = slot.job
        assert job is not None
        slot.job = None
        if job.sampler is not None:
            job.sampler.close()
        if exc is not None:
            job.emit(exc)
            return
        stops = job.stops
        tail = "" if stops.stopped else stops.feed(job.decoder.flush()) + stops.flush()
        job.emit(GenerationChunk(text=tail, finish_reason=reason, prompt_tokens=len(job.ids),
                                 completion_tokens=job.count, stop_sequence=stops.matched))

    def _fail_all(self, exc: BaseException) -> None:
        import llama_cpp

        memory = llama_cpp.llama_get_memory(self.ctx)
        for slot in self.slots:
            if slot.job is not None:
                llama_cpp.llama_memory_seq_rm(memory, slot.seq, -1, -1)
                slot.cached = []
                self._end(slot, exc=exc)

    # --- tokens and logits -------------------------------------------------------------------------

    def piece(self, token: int) -> bytes:
        """A token's bytes, special tokens as their text (cached per token)."""
        cached = self._pieces.get(token)
        if cached is None:
            import llama_cpp

            size = 32
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, size, 0, True)
                if n >= 0:
                    break
                size = -n
            cached = self._pieces[token] = buffer.raw[:n]
        return cached

    def logits(self, row: int) -> np.ndarray:
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
