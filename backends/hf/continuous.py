"""Continuous batching for the transformers engine, on transformers' own `ContinuousBatchingManager`.

A request joins the running batch at the next step instead of waiting for a wave to end; the KV cache is
paged (blocks of `page_size` tokens), and requests whose prompts share a prefix share its blocks (block
sharing: a prefix cache). The manager runs its own generation thread over the same model as the wave
scheduler, with `sdpa` attention, which reads both the paged cache and the waves' caches; the two take turns
on the model, one forward pass at a time (the handle's lock).

What the manager covers, per request: temperature, top_k and top_p (its per-request logits processors; a
greedy request is top_k=1), max_tokens, EOS or ignore_eos. Stop sequences are matched here, on the text,
and the request is then cancelled inside the manager. What it lacks (`uncovered`) goes to the wave
scheduler: a seed (the manager has one generator for every request), min_p, penalties, logit_bias,
grammar constraints, logprobs, echo scoring, and adapters (PEFT routes adapters per row only through its
own forward; while any adapter is loaded every request takes the waves).
"""

from __future__ import annotations

import inspect
import itertools
import threading
from dataclasses import dataclass
from typing import Any

from jarvis.backends.hf.waves import ModelHandle, Sequence, detokenizer
from jarvis.engine import Emit, GenerationChunk, PreparedRequest
from jarvis.text_stream import StopSequenceMatcher

#: How often the result reader wakes with nothing delivered, to pass on cancellations.
POLL_SECONDS = 0.05


def uncovered(request: PreparedRequest) -> str | None:
    """The request field the manager cannot honour (the request then takes the waves), or None."""
    if request.adapter is not None:
        return "adapter"
    if request.seed is not None and request.temperature > 0 and request.top_k != 1:
        return "seed"
    if request.echo and request.logprobs:
        return "echo"
    if request.logprobs:
        return "logprobs"
    if request.compiled_constraint is not None:
        return "constraint"
    if request.logit_bias:
        return "logit_bias"
    if request.min_p > 0:
        return "min_p"
    if request.repetition_penalty != 1.0 or request.presence_penalty or request.frequency_penalty:
        return "penalty"
    if not request.max_tokens:
        return "max_tokens=0"
    return None


@dataclass
class Stream(Sequence):
    """One request inside the manager, as the result reader sees it: a wave's row (no generator, no grammar)
    plus how many of the manager's tokens it has taken."""

    delivered: int = 0


class ContinuousBatcher:
    """Feeds covered requests to a `ContinuousBatchingManager` and turns its outputs into chunks.

    `submit` registers the request and hands its prompt to the manager; one reader thread takes every
    output (`get_result`), emits what each request gained, and passes cancellations back (`cancel_request`)."""

    def __init__(self, handle: ModelHandle, max_batch_size: int, max_len: int, page_size: int,
                 kv_cache_memory: float, kv_cache_blocks: int | None, cuda_graphs: bool | None) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.max_len = max_len
        self.page_size = page_size
        self.kv_cache_memory = kv_cache_memory
        self.kv_cache_blocks = kv_cache_blocks
        self.cuda_graphs = cuda_graphs
        self._manager: Any = None
        self._hooks: list[Any] = []  # the model's forward hooks that hold the handle's lock (start)
        self._vocab = handle.model.config.get_text_config().vocab_size
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="hf-continuous-reader", daemon=True)
        self._stopping = threading.Event()
        self._paused = False  # adapters loaded: new requests take the waves
        self._drained = threading.Condition(self._lock)
        self.served = 0

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        h = self.handle
        # Placeholder values that make transformers build the temperature / top-k / top-p processors; every
        # request passes its own three values (per_request_processors), so these are never applied.
        generation = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.5,
                                      max_new_tokens=self.max_len, eos_token_id=sorted(h.eos_ids),
                                      pad_token_id=h.tokenizer.pad_token_id)
        blocks = self.kv_cache_blocks
        if blocks is None and h.device.type == "cpu":  # on CPU the manager would size the cache from all RAM
            blocks = self.max_batch_size * -(-self.max_len // self.page_size)
        wanted = dict(page_size=self.page_size, num_blocks=blocks, max_requests_per_batch=self.max_batch_size,
                      max_memory_percent=self.kv_cache_memory, allow_block_sharing=True, per_request_processors=True,
                      auto_switch_to_flash=False, use_cuda_graph=self.cuda_graphs)
        known = set(inspect.signature(ContinuousBatchingConfig).parameters)
        if "page_size" not in known:  # transformers before 5.19 calls it block_size (and has no auto_switch_to_flash)
            wanted["block_size"] = wanted.pop("page_size")
        config = ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in known})
        # The manager's thread runs its forward passes on the model the waves use. Two passes at once on one model
        # leave later passes wrong (on CPU: after a stream cancelled while the manager was mid-step, a wave
        # scored ' capital' after 'The' at -1.7 nats where the model's own forward gives -9.7, and kept doing
        # so). So each of the manager's passes holds the handle's lock, as each wave's does; the lock is
        # reentrant, as these hooks fire inside a wave's pass too.
        model = h.model
        self._hooks = [model.register_forward_pre_hook(self._hold),
                       model.register_forward_hook(self._release, always_call=True)]
        self._manager = model.init_continuous_batching(generation_config=generation,
                                                       continuous_batching_config=config)
        self._manager.start()
        self._reader.start()

    def _hold(self, *_: Any) -> None:
        self.handle.lock.acquire()

    def _release(self, *_: Any) -> None:
        self.handle.lock.release()

    def stop(self) -> None:
        self._stopping.set()
        if self._manager is not None:
            self._manager.stop(block=True, timeout=60, hard_stop=True)
        for hook in self._hooks:
            hook.remove()
        if self._reader.is_alive():
            self._reader.join(timeout=10)
        self._fail_all(RuntimeError("the transformers engine stopped"))

    def describe(self) -> dict[str, Any]:
        resolved = getattr(self._manager, "continuous_batching_config", None)
        return {"served": self.served, "in_flight": len(self._streams), "paused_for_adapters": self._paused,
                "page_size": self.page_size,
                "num_blocks": getattr(resolved, "num_blocks", self.kv_cache_blocks),
                "max_batch_tokens": getattr(resolved, "max_batch_tokens", None),
                "max_requests_per_batch": self.max_batch_size,
                "kv_cache_memory": self.kv_cache_memory if self.kv_cache_blocks is None else None,
                "prefix_sharing": getattr(self._manager, "_use_prefix_sharing", None),
                "cuda_graphs": list(getattr(resolved, "use_cuda_graph", None) or ()) or None}

    def health_problem(self) -> str | None:
        if self._manager is None or self._stopping.is_set():
            return None
        error = self._manager.background_thread_status.fatal_error
        if error is not None:
            return f"transformers' continuous batching thread failed: {error}"
        return None

    # --- adapters: the manager runs the plain model, so it pauses while any adapter is loaded -----------

    def pause(self) -> None:
        """New requests take the waves; returns once the manager's requests have finished."""
        with self._lock:
            self._paused = True
            self._drained.wait_for(lambda: not self._streams, timeout=600)

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    # --- requests ------------------------------------------------------------------------------------

    def submit(self, request: PreparedRequest, prompt_ids: list[int], emit: Emit,
               cancel: threading.Event) -> bool:
        """Hand a covered request to the manager; False (nothing done) while paused for adapters."""
        h, r = self.handle, request
        rid = f"{r.request_id}-{next(self._ids)}"
        stream = Stream(r, prompt_ids, emit, cancel, detokenizer(h.tokenizer, prompt_ids),
                        StopSequenceMatcher(r.stop), generator=None)
        greedy = r.temperature == 0 or r.top_k == 1
        with self._lock:
            if self._paused:
                return False
            self._streams[rid] = stream
        accepted = self._manager.add_request(
            prompt_ids, request_id=rid, max_new_tokens=r.max_tokens, streaming=True,
            eos_token_id=-1 if r.ignore_eos else sorted(h.eos_ids),
            temperature=1.0 if greedy else float(r.temperature), top_k=1 if greedy else (r.top_k or self._vocab),
            top_p=1.0 if greedy else float(r.top_p))
        if accepted is None:
            self._close(rid)
            emit(RuntimeError("transformers' continuous batching manager is not accepting requests"))
        else:
            self.served += 1
        return True

    def _read(self) -> None:
        while not self._stopping.is_set():
            output = self._manager.get_result(timeout=POLL_SECONDS)
            if output is not None:
                self._deliver(output)
            for rid, stream in list(self._streams.items()):
                if stream.cancel.is_set():
                    self._manager.cancel_request(rid)
                    self._finish(rid, stream, "cancelled")
            if output is None and not self._manager.is_running() and not self._stopping.is_set():
                error = self._manager.background_thread_status.fatal_error
                self._fail_all(RuntimeError(f"transformers' continuous batching thread stopped: {error}"))
                return

    def _deliver(self, output: Any) -> None:
        rid = output.request_id
        stream = self._streams.get(rid)
        if stream is None:  # cancelled here before the manager saw the cancellation
            return
        if output.error is not None:
            self._close(rid)
            stream.emit(RuntimeError(f"transformers' continuous batching failed the request: {output.error}"))
            return
        h, r = self.handle, stream.request
        new = output.generated_tokens[stream.delivered:]
        stream.delivered = len(output.generated_tokens)
        text, count, reason = "", 0, None
        for token in new:
            if token in h.eos_ids and not r.ignore_eos:
                reason = "stop"
                break
            stream.generated.append(token)
            count += 1
            text += stream.stops.feed(stream.detok.push(token))
            if stream.stops.stopped:
                reason = "stop"
                self._manager.cancel_request(rid)
                break
            if len(stream.generated) >= (r.max_tokens or 0):
                reason = "length"
                break
        if reason is None and output.is_finished():
            reason = "length"
        if text or count:
            stream.emit(GenerationChunk(text=text, token_count=count))
        if reason is not None:
            self._finish(rid, stream, reason)

    def _finish(self, rid: str, stream: Stream, reason: str) -> None:
        self._close(rid)
        tail = "" if stream.stops.stopped else stream.stops.flush()
        stream.emit(GenerationChunk(text=tail, finish_reason=reason,  # type: ignore[arg-type]
                                    prompt_tokens=len(stream.prompt_ids), completion_tokens=len(stream.generated),
                                    stop_sequence=stream.stops.matched))

    def _close(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)
            if not self._streams:
                self._drained.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            self._drained.notify_all()
        for stream in streams:
            stream.emit(error)
