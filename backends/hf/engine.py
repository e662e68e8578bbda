"""The transformers engine: a local model folder, requests decoded together in waves, PEFT LoRA adapters per request.

`JARVIS_MODEL_NAME` is a transformers folder; unset, the embedded GGUF is
converted once into one (`jarvis models convert`). Requests go to a
`BatchScheduler` thread (`waves`) that decodes concurrent requests together as
a wave, its decode loop set by `JARVIS_HF_DECODE`: a dynamic cache that prunes
finished rows, or a static cache (replayed as CUDA graphs with "graphs", the
default on CUDA) that takes new requests while it runs. `JARVIS_HF_BATCHING=continuous`
hands the requests it covers to transformers' continuous batching
(`continuous`) instead. Adapters are PEFT LoRA weights injected next to the
base, and each row of a wave names its own (`adapter_names`), so base and
adapter requests share forward passes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jarvis import hookimpl
from jarvis.backends.model_tools.devices import resolve_device, resolve_dtype
from jarvis.backends.model_tools.folders import named_model_folder, served_model_id
from jarvis.engine import Engine, GenerationChunk, ModelInfo, PreparedRequest, WorkerRelay
from jarvis.engine_rules import check_context_length
from jarvis.errors import ConfigError
from jarvis.settings import JarvisSettings, load_settings

log = logging.getLogger("jarvis.backends.hf.engine")

PREFIX = "JARVIS_HF_"
#: How a wave decodes, per JARVIS_HF_DECODE (resolved): what /v1/engine reports.
WAVE_DECODES = {"dynamic": "a growing KV cache, finished rows pruned at once",
                "static": "a preallocated KV cache per batch-size bucket, requests joining a running wave",
                "graphs": "a preallocated KV cache, the decode step replayed as a CUDA graph, requests joining a "
                          "running wave"}


class HfSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded together in one wave.",
                                json_schema_extra={"fix": "set JARVIS_HF_MAX_BATCH_SIZE between 1 and 256"})
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a wave waits to gather requests.",
                                 json_schema_extra={"fix": "set JARVIS_HF_BATCH_WAIT_MS between 0 and 1000"})
    join_wait_ms: float = Field(10.0, ge=0, le=1000,
                                description="While a static wave decodes, how long requests that arrive may wait "
                                            "to join it together, so that one prefill admits several (they join at "
                                            "once when they are as many as its decoding rows); "
                                            "0 = each joins at the next step.",
                                json_schema_extra={"fix": "set JARVIS_HF_JOIN_WAIT_MS between 0 and 1000"})
    quantization: str = Field("none", pattern="^(none|int8|int4)$",
                              description="Weight quantization: none, int8 or int4 (bitsandbytes, CUDA only).",
                              json_schema_extra={"fix": "set JARVIS_HF_QUANTIZATION to none, int8 or int4"})
    decode: str = Field("auto", pattern="^(auto|dynamic|static|graphs)$",
                        description="Decode loop: dynamic cache, static cache, or static + CUDA graphs; "
                                    "auto = graphs on CUDA, dynamic on CPU.",
                        json_schema_extra={"fix": "set JARVIS_HF_DECODE to auto, dynamic, static or graphs"})
    threads: int | None = Field(None, ge=1, le=512, description="torch CPU threads; unset = torch's default.",
                                json_schema_extra={"fix": "set JARVIS_HF_THREADS to a positive integer or unset it"})
    batching: str = Field("auto", pattern="^(auto|continuous|waves)$",
                          description="continuous: transformers' ContinuousBatchingManager (requests join the "
                                      "running batch, paged KV cache shared by common prefixes) for the requests it "
                                      "covers, waves for the rest; waves: the wave scheduler only, whose static waves "
                                      "take requests while they decode (CUDA graphs on CUDA); auto = waves (on an "
                                      "H200 they serve 10x the tokens/s of continuous batching on sdpa).",
                          json_schema_extra={"fix": "set JARVIS_HF_BATCHING to auto, continuous or waves"})
    page_size: int = Field(256, ge=16, le=4096, description="Tokens per block of the paged KV cache (continuous).",
                           json_schema_extra={"fix": "set JARVIS_HF_PAGE_SIZE between 16 and 4096"})
    kv_cache_memory: float = Field(0.9, gt=0, le=0.95,
                                   description="Share of the free accelerator memory the paged KV cache may take "
                                               "(continuous, CUDA).",
                                   json_schema_extra={"fix": "set JARVIS_HF_KV_CACHE_MEMORY above 0 and at most 0.95"})
    kv_cache_blocks: int | None = Field(None, ge=1, description="Paged KV cache size in blocks of page_size tokens; "
                                        "unset = from kv_cache_memory on CUDA, max_batch_size full contexts on CPU.",
                                        json_schema_extra={"fix": "set JARVIS_HF_KV_CACHE_BLOCKS to a positive "
                                                                  "integer or unset it"})
    cuda_graphs: str = Field("auto", pattern="^(auto|on|off)$",
                             description="CUDA graphs in continuous batching; auto = transformers' choice (off for "
                                         "attention that needs a mask, as sdpa does).",
                             json_schema_extra={"fix": "set JARVIS_HF_CUDA_GRAPHS to auto, on or off"})


#: Adapter slots a stack keeps with CUDA graphs (`JARVIS_HF_DECODE=graphs`): a load beyond them compiles the decode
#: step again. Each slot holds one adapter's A and B for every LoRA layer, at the stack's rank.
GRAPH_ADAPTER_SLOTS = 8
#: Under the state dir: the prefill shapes a "graphs" server captured (PrefillGraphs), captured again at its next
#: start instead of on the first requests that need them.
PREFILL_SHAPES = "hf-prefill-shapes.json"

#: This engine's own settings (JARVIS_HF_*), for showing them without constructing the engine (`jarvis doctor`).
OPTIONS = HfSettings


def continuous_batching_problem() -> str | None:
    """Why this transformers cannot run continuous batching beside the waves, or None. Before 5.19 the manager
    switches the model to a paged-only attention ("paged|sdpa"), which a wave's ordinary forward cannot use."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.19"):
        return (f"transformers {transformers.__version__} switches the whole model to paged attention for "
                "continuous batching, which the waves that serve the other requests cannot use (5.19 and later "
                "read both caches with sdpa)")
    return None


def quantization_config(setting: str, device: str) -> Any:
    if setting == "none":
        return None
    if not device.startswith("cuda"):
        raise ConfigError("JARVIS_HF_QUANTIZATION", setting,
                          "int8/int4 weights need bitsandbytes on a CUDA device; this engine runs on CPU",
                          "unset JARVIS_HF_QUANTIZATION (or set JARVIS_DTYPE=bf16 to halve memory on CPU), "
                          "or serve a GGUF quantization with JARVIS_INFERENCE_ENGINE=llama_cpp")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError("JARVIS_HF_QUANTIZATION", setting, "bitsandbytes is not installed",
                          "pip install bitsandbytes, or unset JARVIS_HF_QUANTIZATION") from None
    if setting == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    import torch

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


class HfEngine(Engine):
    #: Sampling runs per row in the batch scheduler; constraints are xgrammar token masks per row.
    supports = frozenset({"top_k", "min_p", "repetition_penalty", "logit_bias",
                          "json_object", "json_schema", "regex", "choice"})
    name = "hf"
    tokenizer_releases_gil = True  # a Hugging Face fast tokenizer (Rust, batch encode)

    def __init__(self, settings: JarvisSettings) -> None:
        super().__init__()
        self.settings = settings
        self.options: HfSettings = load_settings(HfSettings, prefix=PREFIX)
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise ConfigError("JARVIS_INFERENCE_ENGINE", "hf", f"transformers/torch are not installed ({exc})",
                              "pip install 'jarvis-llm[hf]' (./run.sh test installs it)") from None
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.quantization = quantization_config(self.options.quantization, self.device)
        # Waves unless asked: on CPU transformers' per-request top-k / top-p processors sort the whole vocabulary
        # for every row and step, and on CUDA without flash-attention kernels its paged attention runs eager sdpa,
        # while static waves replay one CUDA graph and take new requests between steps.
        self.continuous = self.options.batching == "continuous"
        self.continuous_unavailable = continuous_batching_problem()
        if self.continuous and self.continuous_unavailable:
            raise ConfigError("JARVIS_HF_BATCHING", "continuous", self.continuous_unavailable,
                              "pip install 'transformers>=5.19', or set JARVIS_HF_BATCHING=waves")
        self.decode = self.options.decode
        if self.decode == "auto":
            self.decode = "graphs" if self.device.startswith("cuda") and not self.continuous else "dynamic"
        if self.decode == "graphs" and not self.device.startswith("cuda"):
            raise ConfigError("JARVIS_HF_DECODE", "graphs", "CUDA graphs need a CUDA device",
                              "set JARVIS_HF_DECODE=static or dynamic on CPU")
        if self.decode == "graphs" and self.continuous:
            raise ConfigError("JARVIS_HF_DECODE", "graphs", "the waves' CUDA graph capture cannot run beside "
                              "continuous batching's generation thread on the same device",
                              "set JARVIS_HF_BATCHING=waves to decode waves with CUDA graphs, or leave "
                              "JARVIS_HF_DECODE=auto (dynamic waves for what continuous batching does not cover)")
        self.folder = named_model_folder(settings.model_name) if settings.model_name is not None else None
        self._handle: Any = None
        self._scheduler: Any = None
        self._info: ModelInfo | None = None
        self._masks: Any = None
        self._continuous: Any = None
        self._paths: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=32)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from jarvis.backends.hf.attention import grouped_sdpa
        from jarvis.backends.hf.waves import BatchScheduler, ModelHandle
        from jarvis.backends.model_tools.convert import embedded_hf_model

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        folder = self.folder or embedded_hf_model(self.settings.data_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # sdpa reads both the paged cache of continuous batching and the waves' caches, so one model serves both;
        # waves alone take the grouped decode attention (attention.py: sdpa that reads each key head once)
        attention = {"attn_implementation": "sdpa" if self.continuous else grouped_sdpa()}
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=self.dtype, quantization_config=self.quantization,
            device_map=self.device if self.quantization else None, **attention)
        if not self.quantization:
            model.to(self.device)
        model.eval()
        check_context_length(self.settings.max_model_len, getattr(model.config, "max_position_embeddings", None))
        eos = model.generation_config.eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                   *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
        self._handle = ModelHandle(model, tokenizer, torch.device(self.device), frozenset(eos_ids),
                                   threading.RLock(), self.stats)
        self._scheduler = BatchScheduler(self._handle, self.options.max_batch_size,
                                         self.options.batch_wait_ms / 1000, decode=self.decode,
                                         max_len=self.settings.max_model_len,
                                         join_seconds=self.options.join_wait_ms / 1000,
                                         prefill_shapes=self.settings.state_path / PREFILL_SHAPES
                                         if self.decode == "graphs" else None)
        self._scheduler.start()
        if self.decode == "graphs":  # compiled and captured here, not on the first requests' time
            log.info("compiled the waves' decode step in %.1f s", self._scheduler.warm_up())
            started = time.monotonic()
            if kept := self._scheduler.warm_prefills():
                log.info("captured the %d prefill shapes the last run used in %.1f s", kept,
                         time.monotonic() - started)
        if self.continuous:
            from jarvis.backends.hf.continuous import ContinuousBatcher

            o = self.options
            self._continuous = ContinuousBatcher(
                self._handle, o.max_batch_size, self.settings.max_model_len, page_size=o.page_size,
                kv_cache_memory=o.kv_cache_memory, kv_cache_blocks=o.kv_cache_blocks,
                cuda_graphs={"auto": None, "on": True, "off": False}[o.cuda_graphs])
            self._continuous.start()
        self._info = ModelInfo(
            id=served_model_id(folder, embedded=self.folder is None), max_model_len=self.settings.max_model_len,
            path=str(folder),
            architecture=getattr(model.config, "model_type", None), chat_template=tokenizer.chat_template,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
            vocab_size=len(tokenizer))
        log.info("transformers loaded %s on %s (%s)", folder, self.device, self.dtype)

    async def stop(self) -> None:
        if self._continuous is not None:
            await asyncio.to_thread(self._continuous.stop)
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)

    def health_problem(self) -> str | None:
        return self._continuous.health_problem() if self._continuous is not None else None

    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("hf engine not started")
        return self._info

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._handle.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self._handle.tokenizer.decode(ids, skip_special_tokens=False)

    def compile_constraint(self, constraint: Any) -> Any:
        """An xgrammar grammar compiled for this tokenizer; each constrained row gets its own matcher."""
        if self._masks is None:
            from jarvis.backends.model_tools.grammars import TokenMasks

            self._masks = TokenMasks(self._handle.tokenizer, self._handle.model.config.get_text_config().vocab_size)
        return self._masks.matcher_factory(self._masks.compile(constraint))

    def batching_kind(self) -> str:
        """What decodes the requests: the waves and their decode loop, behind continuous batching when it is on."""
        waves = f"waves, {self.decode} decode ({WAVE_DECODES[self.decode]})"
        if self.decode != "dynamic" and self._handle is not None and self._handle.has_adapters:
            waves += ("; dynamic while an adapter that does not stack is loaded (PEFT's per-row adapter routing)"
                      if not self._handle.static_ok else
                      f"; the loaded adapters stacked per row ({self._stack_room()})"
                      + (", the step with them replayed as a CUDA graph of its own" if self.decode == "graphs"
                         else ""))
        if self.continuous:
            return f"continuous (transformers' ContinuousBatchingManager); what it does not cover: {waves}"
        return waves

    def describe(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "device": self.device,
                "quantization": self.options.quantization,
                "batching": {"continuous_unavailable": self.continuous_unavailable,
                             "kind": self.batching_kind(),
                             "decode": self._scheduler.decode if self._scheduler else None,
                             "max_batch_size": self.options.max_batch_size,
                             "batch_wait_ms": self.options.batch_wait_ms,
                             "waves": self._scheduler.waves if self._scheduler else 0,
                             "join_wait_ms": self.options.join_wait_ms,
                             "joined_running_wave": self._scheduler.joined if self._scheduler else 0,
                             "join_prefills": self._scheduler.join_prefills if self._scheduler else 0,
                             "static_steps_by_rows": dict(self._scheduler.row_steps) if self._scheduler else {},
                             "wave_shifts": self._scheduler.shifts if self._scheduler else 0,
                             "compiled_steps": self._scheduler.compiles if self._scheduler else 0,
                             "captured_graphs": self._scheduler.captures if self._scheduler else 0,
                             "overlapped_steps": self._scheduler.overlapped if self._scheduler else 0,
                             "captured_prefills": self._scheduler.prefill_captures if self._scheduler else 0,
                             "forward_passes": self.stats.forward_passes,
                             "continuous": self._continuous.describe() if self._continuous else None,
                             "served_by": dict(self._paths), "recent": list(self._recent)},
                "embeddings": self.embedding_info()}

    # --- embeddings ------------------------------------------------------------------------------

    def embedding_info(self) -> dict[str, Any] | None:
        from jarvis.backends.hf.embeddings import MAX_TOKENS_PER_FORWARD
        from jarvis.embeddings import embedding_method

        model = self._handle.model if self._handle is not None else None
        size = model.config.get_text_config().hidden_size if model is not None else 0
        return embedding_method(size, forward=f"the base decoder (no LM head), right-padded groups of up to "
                                              f"{MAX_TOKENS_PER_FORWARD} tokens, under the wave scheduler's "
                                              f"model lock")

    async def embed(self, request: Any) -> Any:
        from jarvis.backends.hf.embeddings import embed_token_ids
        from jarvis.engine import EmbeddingResult

        ids = request.token_ids or []
        return EmbeddingResult(await asyncio.to_thread(embed_token_ids, self._handle, ids), sum(map(len, ids)))

    # --- generation ------------------------------------------------------------------------------

    async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        relay = WorkerRelay()
        ids = request.prompt_token_ids or self.tokenize(request.prompt or "")
        path, reason = self._route(request, ids, relay)
        self._paths[path] += 1
        self._recent.append({"request_id": request.request_id, "path": path, "reason": reason})
        async for chunk in relay.chunks():
            yield chunk

    def _route(self, request: PreparedRequest, ids: list[int], relay: WorkerRelay) -> tuple[str, str | None]:
        """Continuous batching when it covers the request, else the waves: the path taken, and why not the first."""
        from jarvis.backends.hf.continuous import uncovered

        if self._continuous is None:
            batching = self.options.batching  # waves, or auto: the setting as it was given
            reason = (f"JARVIS_HF_BATCHING={batching}" if batching == "waves"
                      else f"JARVIS_HF_BATCHING={batching} resolves to waves on {self.device}")
        else:
            reason = uncovered(request) or ("adapter loaded" if self._handle.has_adapters else None)
            if reason is None:
                if self._continuous.submit(request, ids, relay.emit, relay.cancelled):
                    return "continuous", None
                reason = "adapter loading"
        self._scheduler.submit(request, ids, relay.emit, relay.cancelled)
        return "waves", reason

    # --- adapters --------------------------------------------------------------------------------

    async def load_adapter(self, adapter: Any) -> None:
        await asyncio.to_thread(self._load_adapter, adapter)

    def _load_adapter(self, adapter: Any) -> None:
        from peft import PeftModel

        h = self._handle
        if self._continuous is not None:  # it runs the plain model: let its requests finish first
            self._continuous.pause()
        try:
            with h.lock:
                if hasattr(h.model, "peft_config"):
                    h.model.load_adapter(adapter.path, adapter_name=adapter.name)
                else:
                    h.model = PeftModel.from_pretrained(h.model, adapter.path, adapter_name=adapter.name)
                h.model.eval()
                self._stack_adapters()
        finally:
            if self._continuous is not None and not h.has_adapters:  # the first adapter failed to load
                self._continuous.resume()

    async def unload_adapter(self, name: str) -> None:
        def unload() -> None:
            h = self._handle
            with h.lock:
                remaining = [n for n in h.model.peft_config if n != name]
                if not remaining:  # back to the plain base model, LoRA layers removed
                    self._stack_adapters(drop=True)
                    h.model = h.model.unload()
                    if self._continuous is not None:
                        self._continuous.resume()
                    return
                h.model.delete_adapter(name)
                if h.model.active_adapter not in remaining:
                    h.model.set_adapter(remaining[0])
                self._stack_adapters()

        await asyncio.to_thread(unload)

    def _stack_adapters(self, drop: bool = False) -> None:
        """Write a load or an unload into the stacks (under the handle's lock): mixed batches then run each LoRA
        layer as two matmuls. In place where the change fits them, else a new stack; without a stack (an
        adapter kind that does not stack) PEFT routes the rows. With CUDA graphs every new stack is a new
        compile of the decode step, so a stack keeps slots for GRAPH_ADAPTER_SLOTS adapters (doubled when more
        are loaded), as vLLM keeps `max_loras`; its rank is the largest loaded (a higher one builds anew)."""
        from jarvis.backends.hf.stacked_lora import StackedLora

        h = self._handle
        old = h.stacked
        if not drop and old is not None and old.refresh():
            return
        if old is not None:
            old.close()
        slots = 0
        if self.decode == "graphs" and not drop:
            slots = max(GRAPH_ADAPTER_SLOTS, old.capacity if old is not None else 0)
            while slots < len(h.model.peft_config):
                slots *= 2
        h.stacked = None if drop else StackedLora.build(h.model, slots=slots)

    def _stack_room(self) -> str:
        stacked = self._handle.stacked
        return (f"{len(stacked.slots) - 1} of {stacked.capacity} slots, rank {stacked.rank}"
                if stacked is not None else "none")


@hookimpl
def jarvis_register_engines(register: Callable[..., None]) -> None:
    register("hf", HfEngine, options=OPTIONS)


@hookimpl
def jarvis_register_commands(cli: Any) -> None:
    import click

    models = cli.commands.get("models")
    if models is None:
        return

    @models.command("convert")
    @click.option("--gguf", type=click.Path(exists=True, dir_okay=False), help="GGUF file (default: embedded).")
    @click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: the cache).")
    @click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
                  help="A tokenizer folder to use instead of the GGUF's (checked against llama.cpp's ids).")
    def convert(gguf: str | None, out: str | None, tokenizer: str | None) -> None:
        """Convert a GGUF model (default: the embedded one) into a transformers folder."""
        from jarvis.backends.model_tools.convert import convert_gguf, converted_dir, embedded_hf_model

        settings = load_settings()
        if gguf is None and out is None and tokenizer is None:
            folder = embedded_hf_model(settings.data_dir)
        else:
            from jarvis.embedded_model import embedded_model_path

            source = Path(gguf) if gguf else embedded_model_path(settings.data_dir)
            folder = convert_gguf(source, Path(out) if out else converted_dir(settings.data_dir),
                                  tokenizer_dir=Path(tokenizer) if tokenizer else None)
        click.echo(str(folder))
