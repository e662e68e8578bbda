"""The transformers engine: a local model folder, dynamic batching, PEFT LoRA adapters per request.

`JARVIS_MODEL_NAME` is a transformers folder; unset, the embedded GGUF is
converted once into one (`jarvis models convert`). Requests go to a
`BatchScheduler` thread that decodes concurrent requests together; adapters
are PEFT LoRA weights injected next to the base, and each row of a batch names
its own (`adapter_names`), so base and adapter requests share forward passes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jarvis import hookimpl
from jarvis.engine import Engine, GenerationChunk, GenerationRequest, ModelInfo, WorkerRelay
from jarvis.errors import ConfigError
from jarvis.settings import JarvisSettings, load_settings

log = logging.getLogger("jarvis.backends.hf.engine")

PREFIX = "JARVIS_HF_"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class HfSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded together in one wave.",
                                json_schema_extra={"fix": "set JARVIS_HF_MAX_BATCH_SIZE between 1 and 256"})
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a wave waits to gather requests.",
                                 json_schema_extra={"fix": "set JARVIS_HF_BATCH_WAIT_MS between 0 and 1000"})
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


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("JARVIS_DEVICE", setting, "no CUDA device is visible to torch",
                          "set JARVIS_DEVICE=cpu (or auto), or install a CUDA build of torch on a GPU host")
    return setting


def resolve_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    dtype = getattr(torch, DTYPES[setting])
    if dtype is torch.float16 and device == "cpu":
        raise ConfigError("JARVIS_DTYPE", setting, "float16 matmuls are not supported well on CPU",
                          "set JARVIS_DTYPE=bf16 or fp32 on CPU, or use a CUDA device")
    return dtype


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
            if self.options.batching == "continuous":
                raise ConfigError("JARVIS_HF_BATCHING", "continuous", self.continuous_unavailable,
                                  "pip install 'transformers>=5.19', or set JARVIS_HF_BATCHING=waves")
            log.warning("continuous batching is off: %s", self.continuous_unavailable)
            self.continuous = False
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
        self.folder: Path | None = None
        if settings.model_name is not None:
            self.folder = Path(settings.model_name).expanduser()
            if not (self.folder / "config.json").is_file():
                raise ConfigError("JARVIS_MODEL_NAME", settings.model_name, "not a transformers model folder "
                                  "(no config.json)", "point JARVIS_MODEL_NAME at a folder written by "
                                  "save_pretrained, or unset it to serve the embedded model")
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

        from jarvis.backends.hf.waves import BatchScheduler, ModelHandle
        from jarvis.backends.model_tools.convert import embedded_hf_model

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        folder = self.folder or embedded_hf_model(self.settings.data_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # sdpa reads both the paged cache of continuous batching and the waves' caches, so one model serves both
        attention = {"attn_implementation": "sdpa"} if self.continuous else {}
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=self.dtype, quantization_config=self.quantization,
            device_map=self.device if self.quantization else None, **attention)
        if not self.quantization:
            model.to(self.device)
        model.eval()
        trained = getattr(model.config, "max_position_embeddings", None)
        if trained and self.settings.max_model_len > trained:
            raise ConfigError("JARVIS_MAX_MODEL_LEN", self.settings.max_model_len,
                              f"the model was trained for {trained} tokens of context",
                              f"set JARVIS_MAX_MODEL_LEN to at most {trained}")
        eos = model.generation_config.eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                   *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
        self._handle = ModelHandle(model, tokenizer, torch.device(self.device), frozenset(eos_ids),
                                   threading.Lock(), self.stats)
        self._scheduler = BatchScheduler(self._handle, self.options.max_batch_size,
                                         self.options.batch_wait_ms / 1000, decode=self.decode,
                                         max_len=self.settings.max_model_len)
        self._scheduler.start()
        if self.continuous:
            from jarvis.backends.hf.continuous import ContinuousBatcher

            o = self.options
            self._continuous = ContinuousBatcher(
                self._handle, o.max_batch_size, self.settings.max_model_len, page_size=o.page_size,
                kv_cache_memory=o.kv_cache_memory, kv_cache_blocks=o.kv_cache_blocks,
                cuda_graphs={"auto": None, "on": True, "off": False}[o.cuda_graphs])
            self._continuous.start()
        model_id = folder.name.removesuffix("-hf") if self.folder is None else folder.name
        self._info = ModelInfo(
            id=model_id, max_model_len=self.settings.max_model_len, path=str(folder),
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

    def describe(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "device": self.device,
                "quantization": self.options.quantization,
                "batching": {"continuous_unavailable": self.continuous_unavailable,
                             "kind": "continuous (transformers' ContinuousBatchingManager) and waves for what "
                                     "it does not cover" if self.continuous else "dynamic (waves, per-row finishing)",
                             "decode": self._scheduler.decode if self._scheduler else None,
                             "max_batch_size": self.options.max_batch_size,
                             "batch_wait_ms": self.options.batch_wait_ms,
                             "waves": self._scheduler.waves if self._scheduler else 0,
                             "joined_running_wave": self._scheduler.joined if self._scheduler else 0,
                             "wave_shifts": self._scheduler.shifts if self._scheduler else 0,
                             "forward_passes": self.stats.forward_passes,
                             "continuous": self._continuous.describe() if self._continuous else None,
                             "served_by": dict(self._paths), "recent": list(self._recent)}}

    # --- generation ------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        relay = WorkerRelay()
        ids = request.prompt_token_ids or self.tokenize(request.prompt or "")
        path, reason = self._route(request, ids, relay)
        self._paths[path] += 1
        self._recent.append({"request_id": request.request_id, "path": path, "reason": reason})
        async for chunk in relay.chunks():
            yield chunk

    def _route(self, request: GenerationRequest, ids: list[int], relay: WorkerRelay) -> tuple[str, str | None]:
        """Continuous batching when it covers the request, else the waves: the path taken, and why not the first."""
        from jarvis.backends.hf.continuous import uncovered

        if self._continuous is None:
            reason = "JARVIS_HF_BATCHING=waves"
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
        finally:
            if self._continuous is not None and not h.has_adapters:  # the first adapter failed to load
                self._continuous.resume()

    async def unload_adapter(self, name: str) -> None:
        def unload() -> None:
            h = self._handle
            with h.lock:
                remaining = [n for n in h.model.peft_config if n != name]
                if not remaining:  # back to the plain base model, LoRA layers removed
                    h.model = h.model.unload()
                    if self._continuous is not None:
                        self._continuous.resume()
                    return
                h.model.delete_adapter(name)
                if h.model.active_adapter not in remaining:
                    h.model.set_adapter(remaining[0])

        await asyncio.to_thread(unload)


@hookimpl
def jarvis_register_engines(register: Callable[[str, Callable[..., Engine]], None]) -> None:
    register("hf", HfEngine)


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
