"""Jarvis's engines vs `vllm serve` on one GPU: the same model, the same engine arguments, `vllm bench serve`.

  raw     `vllm serve MODEL` with its own defaults (--raw-flags defaults: only the memory share, the context,
          bf16 and the LoRA flags are given), or with the engine arguments Jarvis plans, as CLI flags
          (--raw-flags planned), so a difference of defaults shows instead of being copied;
  jarvis  `python -m jarvis serve` with JARVIS_INFERENCE_ENGINE=vllm and JARVIS_MODEL_NAME=MODEL;
  hf      `python -m jarvis serve` with JARVIS_INFERENCE_ENGINE=hf (bf16, the engine's defaults), --sides raw,hf;
          hf-waves forces its wave scheduler (the default), hf-continuous transformers' continuous batching,
          hf-graphs continuous batching with CUDA graphs forced, hf-joinN the waves with JARVIS_HF_JOIN_WAIT_MS=N
          (arrivals mid-wave held up to N ms so that one prefill admits several; N = 0, 20, 60; the default is 10).

The model is random weights of a real shape (Gemma-3-270M from bench/gemma3_270m_config.json, or Llama-3-8B
with its vocabulary widened to the tokenizer's), bf16, saved with the embedded model's tokenizer, or real
weights: the embedded GGUF (--gguf) converted on the host. The servers run at once (the vLLM ones with
JARVIS_VLLM_GPU_MEMORY_UTILIZATION each, default 0.4; the hf one starts after them and takes
--hf-kv-cache-memory of what they leave), each in its own process session so a later call can reuse them
(--keep-servers, then --reuse; a call that starts servers moves an earlier call's runs aside instead of
counting them). `vllm bench serve --backend openai --ignore-eos` (dropped for every side when
Jarvis refuses the field; random prompts, 256 in / 128 out by default, temperature 1) drives one server at a
time, alternating which goes first at each level: concurrency levels (--concurrency) and request rates
(--rates, Poisson arrivals). The tables give raw, the side and side/raw for output tokens/s, TTFT, TPOT and ITL
(p50, p99), the goals each side is held to (with each side's spread of tokens/s over the rounds, and whether
the ratio is inside it, so a ratio the rounds cannot resolve is not read as a miss or a pass), and
single-stream TPOT against the memory-bandwidth floor (weight bytes / 4.3 TB/s).

Multi-LoRA (--adapters N): N random LoRA adapters (rank --lora-rank on the attention and MLP projections, B
not zero, so each changes the output) are made on the host; `vllm serve` gets `--enable-lora --max-loras N
--max-lora-rank R --lora-modules a0=DIR ...`, every Jarvis side JARVIS_LORA_MODULES, and `vllm bench serve
--lora-modules a0 ... a{N-1}` sends each request to one adapter at random: a mixed load of N adapters.

    python bench/gpu_serving.py --tokenizer DIR [--shape gemma3-270m|llama3-8b] [--concurrency 1,16,64,256]
    python bench/gpu_serving.py --gguf FILE --sides raw,hf --concurrency 1,16,64 --rates 8,32
    python bench/gpu_serving.py --adapters 4 --sides raw,jarvis,hf --concurrency 64
    python bench/gpu_serving.py --dry-run        # no GPU: the plan, the commands, the bench command
    python bench/gpu_serving.py --report DIR     # no GPU: the tables again from a run's saved results

A GPU host needs vllm (the `vllm` module and its `bench serve`) and Jarvis installed; see ../shared/gpu.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
GEMMA_CONFIG = HERE / "gemma3_270m_config.json"
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "hidden_act": "silu",
             "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
SHAPES = ("gemma3-270m", "llama3-8b")
BANDWIDTH_TB_S = 4.3  # device-to-device copy measured on this workplace's H200 (KINDS.md)
METRICS = (("out tok/s", "output_throughput", True), ("TTFT p50", "ttft_p50", False),
           ("TTFT p99", "ttft_p99", False), ("TPOT p50", "tpot_p50", False), ("TPOT p99", "tpot_p99", False),
           ("ITL p50", "itl_p50", False), ("ITL p99", "itl_p99", False), ("tokens/chunk", "tokens_per_chunk", False))
# raw `vllm serve`; Jarvis on vllm; Jarvis on transformers
JOIN_WAITS_MS = (0, 20, 60)
SIDES = ("raw", "jarvis", "hf", "hf-waves", "hf-continuous", "hf-graphs", *(f"hf-join{ms}" for ms in JOIN_WAITS_MS))
#: The transformers sides: the engine's defaults, and the two batching paths forced (settings on top of hf_settings).
HF_SIDES = {"hf": {}, "hf-waves": {"JARVIS_HF_BATCHING": "waves"},
            "hf-continuous": {"JARVIS_HF_BATCHING": "continuous"},
            "hf-graphs": {"JARVIS_HF_BATCHING": "continuous", "JARVIS_HF_CUDA_GRAPHS": "on"},
            **{f"hf-join{ms}": {"JARVIS_HF_BATCHING": "waves", "JARVIS_HF_JOIN_WAIT_MS": str(ms)}
               for ms in JOIN_WAITS_MS}}
GOALS = {"jarvis": "tok/s ≥ 1.0× raw at every level; TPOT p50 ≤ 1.02× and ITL p99 ≤ 1.2× at C=1, 16, 64; "
                   "TTFT p50 ≤ 1.05× at C=256",
         **{side: "tok/s ≥ 0.6× raw vLLM at C=1, ≥ 0.65× at C=16, ≥ 0.8× at C=64; TTFT p50 ≤ 1.5× at C=16"
            for side in HF_SIDES}}
#: The levels where Jarvis's vllm engine is held to vLLM's TPOT and ITL tail.
JARVIS_STEP_LEVELS = (("c", 1.0), ("c", 16.0), ("c", 64.0))
#: The transformers sides' tok/s goals by concurrency, and their TTFT p50 goal (at C=16 only).
HF_TOKENS_GOAL, HF_TTFT_GOAL = {1.0: 0.6, 16.0: 0.65, 64.0: 0.8}, 1.5


# --- the model -----------------------------------------------------------------------------------


def tokenizer_folder(source: Path, work: Path) -> Path:
    """The tokenizer files, with a carried tokenizer.json.gz unpacked."""
    target = work / "tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name.endswith(".gz"):
            with gzip.open(f) as zipped, open(target / f.name.removesuffix(".gz"), "wb") as out:
                shutil.copyfileobj(zipped, out)
        elif f.is_file():
            shutil.copy(f, target / f.name)
    return target


def shape_config(shape: str, vocab: int, bos: int | None, eos: int | None) -> dict[str, Any]:
    if shape == "gemma3-270m":
        config = json.loads(GEMMA_CONFIG.read_text())
    else:
        config = {**LLAMA3_8B, "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos}
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    if config["vocab_size"] < vocab:
        raise SystemExit(f"the tokenizer has {vocab} tokens, more than the {shape} shape's {config['vocab_size']}")
    return config


def make_model(shape: str, tokenizer_dir: Path, folder: Path) -> Path:
    """Random bf16 weights of `shape`, saved with the tokenizer (kept when already there)."""
    if (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = shape_config(shape, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_")})
    started = time.monotonic()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except TypeError:  # transformers 4
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"made {shape}: {params / 1e9:.3f} B parameters, bf16, in {time.monotonic() - started:.0f} s: {folder}")
    return folder


def make_adapters(folder: Path, adapters: dict[str, Path], rank: int) -> None:
    """Random PEFT LoRA adapters of `rank` on the attention and MLP projections, each with its own seed and B
    drawn (not PEFT's zeros), so each adapter changes the model's output (kept when already there)."""
    if all((path / "adapter_config.json").is_file() for path in adapters.values()):
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    for seed, (name, path) in enumerate(adapters.items()):
        torch.manual_seed(seed)
        with torch.no_grad():
            for key, weight in model.named_parameters():
                if "lora_" in key:
                    weight.normal_(0.0, 0.02)
        model.save_pretrained(str(path))
        print(f"made adapter {name}: rank {rank}, {path}")
    del model, base


def convert_gguf(gguf: Path, folder: Path, tokenizer: Path | None = None) -> Path:
    """The GGUF's weights as a transformers folder (Jarvis's converter; kept when already there). With
    `tokenizer` (a folder), its tokenizer replaces the GGUF's: transformers before 5.19 converts Gemma 3's
    GGUF tokenizer into one that splits words unlike llama.cpp, and the converter refuses it."""
    if not (folder / "config.json").is_file():
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "jarvis", "models", "convert", "--gguf", str(gguf), "--out",
                        str(folder), *(["--tokenizer", str(tokenizer)] if tokenizer else [])], check=True)
        print(f"converted {gguf.name} in {time.monotonic() - started:.0f} s: {folder}")
    return folder


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --- the two servers -----------------------------------------------------------------------------


def jarvis_settings(folder: Path, name: str, args: argparse.Namespace) -> dict[str, str]:
    """The vllm side's settings; they also give the engine arguments both vLLM servers run."""
    return {"JARVIS_INFERENCE_ENGINE": "vllm", "JARVIS_MODEL_NAME": str(folder), "JARVIS_SERVED_MODEL_NAME": name,
            "JARVIS_VLLM_GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization),
            "JARVIS_MAX_MODEL_LEN": str(args.max_model_len), "JARVIS_VLLM_DTYPE": "bf16",
            "JARVIS_VLLM_ENABLE_LORA": "true" if args.adapters else "false",
            **({"JARVIS_VLLM_MAX_LORAS": str(args.adapters)} if args.adapters else {}),
            **adapter_settings(folder, args), **dict(kv.split("=", 1) for kv in args.set)}


def adapter_folders(folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The --adapters adapters' names and folders (made by make_adapters beside the model)."""
    return {f"a{i}": folder.parent / "adapters" / f"a{i}" for i in range(args.adapters)}


def adapter_settings(folder: Path, args: argparse.Namespace) -> dict[str, str]:
    """What every Jarvis side needs to serve the --adapters adapters from its start."""
    if not args.adapters:
        return {}
    adapters = adapter_folders(folder, args)
    return {"JARVIS_ADAPTER_ROOT": str(folder.parent / "adapters"), "JARVIS_MAX_LORA_RANK": str(args.lora_rank),
            "JARVIS_LORA_MODULES": ",".join(f"{name}={path}" for name, path in adapters.items())}


def hf_batch(args: argparse.Namespace) -> int:
    """The hf sides' rows: --hf-max-batch-size, else the highest level and at least 64, so a server kept for a
    later --reuse run at higher levels is not one that decodes a request at a time (a static wave's step costs
    the same for 1 row and for 64 on an H100)."""
    return args.hf_max_batch_size or min(256, max(64, *levels_of(args.concurrency)))


def find_key(tree: Any, key: str) -> Any:
    """The first value of `key` anywhere in a JSON tree (None if absent)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            if (found := find_key(item, key)) is not None:
                return found
    return None


def check_reused_batch(state: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuse to measure a level above the rows a reused hf server was started with."""
    highest = max(levels_of(args.concurrency))
    for side, server in state["servers"].items():
        if side not in HF_SIDES or side not in state["sides"]:
            continue
        rows = find_key(engine_info(server["port"]), "max_batch_size")
        if isinstance(rows, int) and rows < highest:
            sys.exit(f"{side} was started with JARVIS_HF_MAX_BATCH_SIZE={rows}, below the level {highest}: it would "
                     f"decode {rows} request(s) at a time. Start it again (--stop, then without --reuse).")


def hf_settings(folder: Path, name: str, args: argparse.Namespace) -> dict[str, str]:
    """The transformers side: bf16 on the GPU, its default batching, hf_batch(args) rows."""
    return {"JARVIS_INFERENCE_ENGINE": "hf", "JARVIS_MODEL_NAME": str(folder), "JARVIS_SERVED_MODEL_NAME": name,
            "JARVIS_DEVICE": "cuda", "JARVIS_DTYPE": "bf16", "JARVIS_MAX_MODEL_LEN": str(args.max_model_len),
            "JARVIS_HF_MAX_BATCH_SIZE": str(hf_batch(args)),
            "JARVIS_HF_KV_CACHE_MEMORY": str(args.hf_kv_cache_memory),
            **adapter_settings(folder, args), **dict(kv.split("=", 1) for kv in args.set_hf)}


def all_settings(folder: Path, name: str, args: argparse.Namespace) -> dict[str, dict[str, str]]:
    return {"jarvis": jarvis_settings(folder, name, args),
            **{side: {**hf_settings(folder, name, args), **preset} for side, preset in HF_SIDES.items()}}


def levels_of(spec: str) -> list[int]:
    return [int(c) for c in spec.split(",") if c]


def planned(settings: dict[str, str], folder: Path, assume_h200: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine arguments and environment Jarvis's vllm engine would use for `settings` (plan_engine)."""
    from jarvis.backends.vllm.config import PREFIX, Platform, VllmSettings, plan_engine
    from jarvis.settings import load_settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("JARVIS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(settings)
    try:
        platform = Platform("cuda", (139.8,), ram_gib=100) if assume_h200 else Platform.detect()
        plan = plan_engine(load_settings(), load_settings(VllmSettings, prefix=PREFIX), platform, folder)
    finally:
        for k in settings:
            os.environ.pop(k, None)
        os.environ.update(saved)
    if plan.problems:
        raise SystemExit("Jarvis refuses this configuration:\n" + "\n".join(f"  {p}" for p in plan.problems))
    return {k: v for k, v in plan.engine_args.items() if k not in ("model", "tokenizer")}, plan.env


def cli_flags(engine_args: dict[str, Any]) -> list[str]:
    """`vllm serve` flags for AsyncEngineArgs keyword arguments (bools as --x / --no-x, lists as nargs)."""
    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_flags(engine_args: dict[str, Any], folder: Path, args: argparse.Namespace) -> list[str]:
    """`vllm serve`'s flags: its own defaults but for the memory share, the context, bf16 and LoRA
    (--raw-flags defaults), or every engine argument Jarvis plans (--raw-flags planned)."""
    if args.raw_flags == "planned":
        flags = cli_flags(engine_args)
    else:
        flags = ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-model-len",
                 str(args.max_model_len), "--dtype", "bfloat16"]
        if args.adapters:
            flags += ["--enable-lora", "--max-loras", str(args.adapters), "--max-lora-rank",
                      str(engine_args.get("max_lora_rank", args.lora_rank))]
    if args.adapters:
        flags += ["--lora-modules", *(f"{n}={p}" for n, p in adapter_folders(folder, args).items())]
    return flags


def commands(folder: Path, name: str, engine_args: dict[str, Any], settings: dict[str, dict[str, str]], work: Path,
             ports: dict[str, int], args: argparse.Namespace) -> dict[str, tuple[list[str], dict[str, str]]]:
    """What each side in `ports` runs, and the environment it adds (only these JARVIS_* reach Jarvis)."""
    raw = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(folder), "--host", "127.0.0.1",
           "--port", str(ports.get("raw", 0)), "--served-model-name", name, *raw_flags(engine_args, folder, args)]
    jarvis = [sys.executable, "-m", "jarvis", "serve"]
    every = {"raw": (raw, {"VLLM_CACHE_ROOT": str(work / "vllm-cache-raw")})}
    for side in settings:
        every[side] = (jarvis, {**settings[side], "JARVIS_HOST": "127.0.0.1", "JARVIS_PORT": str(ports.get(side, 0)),
                                "JARVIS_DATA_DIR": str(work / "jarvis-data"),
                                "JARVIS_STATE_DIR": str(work / f"jarvis-state-{side}"),
                                "VLLM_CACHE_ROOT": str(work / "vllm-cache-jarvis")})
    return {side: every[side] for side in ports}


def start_servers(folder: Path, name: str, engine_args: dict[str, Any], plan_env: dict[str, str],
                  settings: dict[str, dict[str, str]], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One server at a time, each ready before the next starts, each in a new process session (it outlives this
    script); ready or their logs. vLLM sizes its KV cache from the memory its start-up profile sees free: two
    starting at once counted each other's allocations, and one came up with 57 thousand tokens of cache beside
    the other's 1.6 million (an H100, 2026-12-07). The transformers side sizes its cache from what they leave."""
    sides, timeout_s = args.sides, args.ready_timeout
    ports = {side: free_port() for side in sides}
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    state: dict[str, Any] = {"model": str(folder), "name": name, "engine_args": engine_args, "servers": {},
                             "sides": list(sides)}
    for one in (*(s for s in sides if s not in HF_SIDES), *(s for s in sides if s in HF_SIDES)):
        for side, (command, extra) in commands(folder, name, engine_args, settings, work, {one: ports[one]},
                                               args).items():
            log = work / f"{side}.log"
            env = {**base, **plan_env, **extra}
            process = subprocess.Popen(command, env=env, cwd=work, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                       start_new_session=True)
            state["servers"][side] = {"pid": process.pid, "port": ports[side], "log": str(log), "command": command}
            print(f"started {side} (pid {process.pid}, port {ports[side]}): {' '.join(command)}")
        (work / "state.json").write_text(json.dumps(state, indent=2))
        wait_ready(state, timeout_s)
    return state


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a child that exited but was not reaped yet is a zombie, not a server
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


def ready(side: str, port: int) -> bool:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    except httpx.HTTPError:
        return False
    if side == "raw":
        return response.status_code == 200
    return response.status_code == 200 and response.json().get("status") == "ready"


def wait_ready(state: dict[str, Any], timeout_s: float) -> None:
    started, waiting = time.monotonic(), set(state["servers"])
    while waiting:
        for side in sorted(waiting):
            server = state["servers"][side]
            if ready(side, server["port"]):
                print(f"{side} ready after {time.monotonic() - started:.0f} s")
                waiting.discard(side)
            elif not alive(server["pid"]):
                raise SystemExit(f"{side} exited before it was ready:\n{Path(server['log']).read_text()[-6000:]}")
        if waiting and time.monotonic() - started > timeout_s:
            logs = "\n".join(f"--- {s} ---\n{Path(state['servers'][s]['log']).read_text()[-3000:]}" for s in waiting)
            raise SystemExit(f"not ready within {timeout_s:.0f} s: {', '.join(waiting)}\n{logs}")
        if waiting:
            time.sleep(1)


def stop_servers(state: dict[str, Any]) -> None:
    for server in state["servers"].values():
        if alive(server["pid"]):
            os.killpg(server["pid"], signal.SIGTERM)  # its own session: the server and its engine process
    deadline = time.monotonic() + 60
    for server in state["servers"].values():
        while alive(server["pid"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        if alive(server["pid"]):
            os.killpg(server["pid"], signal.SIGKILL)


def engine_config_line(log: str) -> str | None:
    """vLLM's one-line engine config ('Initializing a V1 LLM engine (vX) with config: ...'), less the names."""
    match = re.search(r"Initializing a V1 LLM engine \(v[^)]*\) with config: (.*)", log)
    if not match:
        return None
    line = re.sub(r"(model|tokenizer|served_model_name)=[^,]*, ", "", match.group(1).strip())
    return re.sub(r"vllm-cache-(raw|jarvis)", "vllm-cache-SIDE", line)  # each side compiles into its own cache


def kv_cache_tokens(state: dict[str, Any]) -> dict[str, int | None]:
    """Each vLLM server's KV cache in tokens, from its log ('GPU KV cache size: N tokens')."""
    sizes: dict[str, int | None] = {}
    for side, server in state["servers"].items():
        found = re.findall(r"KV cache size: ([\d,]+) tokens", Path(server["log"]).read_text())
        sizes[side] = int(found[-1].replace(",", "")) if found else None
    return sizes


def kv_mismatch(sizes: dict[str, int | None]) -> str | None:
    """A sentence when the vLLM servers' KV caches differ by more than 5 %: their comparison is not fair."""
    known = {side: n for side, n in sizes.items() if n}
    if len(known) > 1 and min(known.values()) < 0.95 * max(known.values()):
        return ("the vLLM servers' KV caches differ (" + ", ".join(f"{s} {n:,} tokens" for s, n in known.items())
                + "): a server with less cache preempts or queues sooner, so its numbers are not comparable")
    return None


def parity(state: dict[str, Any]) -> dict[str, Any]:
    """Does Jarvis run the engine `vllm serve` runs? vLLM's own config lines, and Jarvis's /v1/engine."""
    lines = {side: engine_config_line(Path(s["log"]).read_text()) for side, s in state["servers"].items()}
    tokens = {side: re.findall(r"max_num_batched_tokens=(\d+)", Path(s["log"]).read_text())
              for side, s in state["servers"].items()}
    report: dict[str, Any] = {"max_num_batched_tokens": {s: t[-1] if t else None for s, t in tokens.items()},
                              "kv_cache_tokens": kv_cache_tokens(state)}
    if lines.get("raw") and lines.get("jarvis"):
        raw_items, jarvis_items = lines["raw"].split(", "), lines["jarvis"].split(", ")
        report["engine_config_identical"] = raw_items == jarvis_items
        report["only_raw"] = [i for i in raw_items if i not in jarvis_items]
        report["only_jarvis"] = [i for i in jarvis_items if i not in raw_items]
        report["engine_config"] = lines["raw"]
    for side in SIDES[1:]:
        if side not in state["servers"]:
            continue
        report[f"{side}_engine"] = engine_info(state["servers"][side]["port"]) or "unavailable"
    return report


# --- the benchmark -------------------------------------------------------------------------------


def jarvis_takes_ignore_eos(state: dict[str, Any]) -> tuple[bool, str]:
    """Whether every Jarvis side accepts vLLM's `ignore_eos` (one 1-token request); all sides get it only if so."""
    body = {"model": state["name"], "prompt": "Hello", "max_tokens": 1, "ignore_eos": True}
    for side in SIDES[1:]:
        if side not in state["servers"]:
            continue
        try:
            response = httpx.post(f"http://127.0.0.1:{state['servers'][side]['port']}/v1/completions", json=body,
                                  timeout=60)
        except httpx.HTTPError as exc:
            return False, f"{side}: {exc}"
        if response.status_code != 200:
            return False, f"{side}: {response.status_code} {response.text[:300]}"
    return True, "200"


def bench_command(side: str, state: dict[str, Any], concurrency: int, prompts: int, args: argparse.Namespace,
                  result_dir: Path, filename: str, rate: float | None = None) -> list[str]:
    if state.get("ignore_eos", True):
        data = ["--dataset-name", "random", "--random-input-len", str(args.input_len),
                "--random-output-len", str(args.output_len), "--ignore-eos"]
    else:  # vllm bench sends ignore_eos with every random-dataset request: the same random prompts, as a file
        data = ["--dataset-name", "custom", "--dataset-path", state["prompts"], "--skip-chat-template",
                "--custom-output-len", str(args.output_len)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
            "--base-url", f"http://127.0.0.1:{state['servers'][side]['port']}", "--endpoint", "/v1/completions",
            "--model", state["name"], "--tokenizer", state["model"], *data, "--num-prompts", str(prompts),
            *(["--lora-modules", *state["adapters"]] if state.get("adapters") else []),
            "--max-concurrency", str(concurrency), *(["--request-rate", str(rate)] if rate else []),
            "--temperature", "1.0", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(result_dir),
            "--result-filename", filename]


def prompts_for(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_prompts, args.waves * concurrency)


def random_prompts(folder: Path, count: int, length: int, path: Path) -> str:
    """`count` prompts of `length` random tokens (decoded, re-encoded, cut), as a custom-dataset JSONL file."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng, lines = random.Random(0), []
    for _ in range(count):
        ids = [rng.randrange(1000, len(tokenizer)) for _ in range(length)]  # past the special tokens
        ids = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"][:length]
        lines.append(json.dumps({"prompt": tokenizer.decode(ids)}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_bench(command: list[str], log: Path) -> None:
    """`vllm bench serve ...`, in this process (vLLM's import once, not per run), its output into `log`."""
    import contextlib

    try:
        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as bench_main
    except ImportError:  # another layout: the CLI itself
        with open(log, "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=600)
        if done.returncode:
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{log.read_text()[-4000:]}") from None
        return
    parser = argparse.ArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        bench_main(parser.parse_args(command[command.index("serve") + 1:]))


def summarize(result: dict[str, Any]) -> dict[str, float]:
    def pick(metric: str, p: str) -> float:
        return result.get(f"p{p}_{metric}_ms", result.get(f"median_{metric}_ms") if p == "50" else None)

    row = {"output_throughput": result["output_throughput"], "completed": result.get("completed"),
           "total_output_tokens": result.get("total_output_tokens")}
    for metric in ("ttft", "tpot", "itl"):
        for p in ("50", "99"):
            row[f"{metric}_p{p}"] = pick(metric, p)
    # tokens per event above 1.00 stretch ITL's tail while TPOT stays: a server whose consumer reads slower than
    # the engine decodes gets several tokens in one event (vLLM merges a request's waiting deltas), and a server
    # that sends no event for a token whose text is held back (partial UTF-8, a stop string's start) does the
    # same; vLLM's server sends that event with empty text, and so does Jarvis
    itls, lens = result.get("itls"), result.get("output_lens")
    if itls and lens:
        chunks = sum(len(gaps) + 1 for gaps, n in zip(itls, lens) if n)
        row["tokens_per_chunk"] = sum(lens) / chunks if chunks else None
    return row


Level = tuple[str, float]  # ("c", concurrency) or ("q", request rate per second)


def level_name(level: Level) -> str:
    kind, value = level
    return f"C={value:g}" if kind == "c" else f"{value:g}/s"


def load_results(result_dir: Path) -> dict[Level, dict[str, list[dict[str, float]]]]:
    """{level: {side: [summary per round]}} from the files `vllm bench serve` saved."""
    results: dict[Level, dict[str, list[dict[str, float]]]] = {}
    for f in sorted(result_dir.glob("*-r*.json")):
        match = re.fullmatch(rf"({'|'.join(map(re.escape, SIDES))})-([cq])([\d.]+)-r(\d+)\.json", f.name)
        if match is None:
            continue
        side, kind, value, _ = match.groups()
        level = (kind, float(value))
        results.setdefault(level, {}).setdefault(side, []).append(summarize(json.loads(f.read_text())))
    return dict(sorted(results.items()))


def median_of(rounds: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(sides: dict[str, list[dict[str, float]]], side: str, key: str) -> float | None:
    mine, raw = median_of(sides.get(side, []), key), median_of(sides.get("raw", []), key)
    return mine / raw if mine is not None and raw else None


def ratio_table(results: dict[Level, dict[str, list[dict[str, float]]]], side: str) -> str:
    """One row per level: raw, `side`, side/raw for each metric (times in ms; median of rounds)."""
    head = f"{'level':>7} " + " ".join(f"{label:^26}" for label, _, _ in METRICS)
    sub = f"{'':>7} " + " ".join(f"{'raw':>9}{side:>9}{'ratio':>8}" for _ in METRICS)
    rows = [f"{side} vs raw vLLM", head, sub]
    for level, sides in results.items():
        if "raw" not in sides or side not in sides:
            continue
        cells = []
        for _, key, _ in METRICS:
            raw, mine, r = median_of(sides["raw"], key), median_of(sides[side], key), ratio(sides, side, key)
            digits = 0 if key == "output_throughput" else 2
            cells.append(f"{raw:9.{digits}f}{mine:9.{digits}f}" + (f"{r:8.3f}" if r is not None else f"{'-':>8}")
                         if raw is not None and mine is not None else f"{'-':>26}")
        rows.append(f"{level_name(level):>7} " + " ".join(cells))
    return "\n".join(rows)


def spread(rounds: list[dict[str, float]], key: str = "output_throughput") -> float | None:
    """Half the range of `key` over the rounds, as a fraction of their median: how far one round is from another."""
    values = [r[key] for r in rounds if r.get(key)]
    return (max(values) - min(values)) / 2 / statistics.median(values) if len(values) > 1 else None


def check(value: float | None, limit: float, at_least: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ({'ok' if (value >= limit if at_least else value <= limit) else 'MISS'} " \
           f"{'≥' if at_least else '≤'}{limit:g})"


def goals(results: dict[Level, dict[str, list[dict[str, float]]]], weights: int | None, output_len: int) -> str:
    """The targets of each side against raw vLLM (GOALS), and single-stream decode against the bandwidth floor."""
    lines = []
    for side in SIDES[1:]:
        rows = {level: sides for level, sides in results.items() if side in sides and "raw" in sides}
        if not rows:
            continue
        lines.append(f"{side}: {GOALS[side]}")
        for level, sides in rows.items():
            if not (median_of(sides["raw"], "output_throughput") and median_of(sides[side], "output_throughput")):
                lines.append(f"  {level_name(level):<7} no completed requests on one side: see its log under logs/")
                continue
            hf = side in HF_SIDES
            if hf and (level[0] != "c" or level[1] not in HF_TOKENS_GOAL):
                continue
            tps, ttft = ratio(sides, side, "output_throughput"), ratio(sides, side, "ttft_p50")
            line = f"  {level_name(level):<7} tok/s ratio {check(tps, HF_TOKENS_GOAL[level[1]] if hf else 1.0, True)}"
            if hf and level[1] == 16.0:
                line += f"   TTFT p50 ratio {check(ttft, HF_TTFT_GOAL, False)}"
            if not hf and level in JARVIS_STEP_LEVELS:
                line += (f"   TPOT p50 ratio {check(ratio(sides, side, 'tpot_p50'), 1.02, False)}   "
                         f"ITL p99 ratio {check(ratio(sides, side, 'itl_p99'), 1.2, False)}")
            if not hf and level == ("c", 256.0):
                line += f"   TTFT p50 ratio {check(ttft, 1.05, False)}"
            raw_noise, side_noise = spread(sides["raw"]), spread(sides[side])
            if raw_noise is not None and side_noise is not None:
                line += f"   rounds' tok/s spread ±{raw_noise:.1%} raw, ±{side_noise:.1%} {side}"
                if tps is not None and abs(tps - 1) < max(raw_noise, side_noise):  # not resolved by these rounds
                    line += " (the ratio is inside it)"
            short = [s for s in ("raw", side) for r in sides[s] if r.get("completed") and r.get("total_output_tokens")
                     and r["total_output_tokens"] < r["completed"] * output_len]
            if short:
                line += f"   (fewer output tokens than asked on: {', '.join(sorted(set(short)))})"
            lines.append(line)
    single = results.get(("c", 1.0), {})
    if weights and single:
        floor_ms = weights / (BANDWIDTH_TB_S * 1e12) * 1e3
        for side, rounds in single.items():
            tpot = median_of(rounds, "tpot_p50")
            if tpot:
                lines.append(f"single-stream decode {side}: TPOT p50 {tpot:.3f} ms vs bandwidth floor {floor_ms:.3f} "
                             f"ms ({weights / 2**30:.2f} GiB of weights / {BANDWIDTH_TB_S} TB/s): "
                             f"{tpot / floor_ms:.1f}× the floor")
    return "\n".join(lines)


def run_levels(args: argparse.Namespace) -> list[Level]:
    return [("c", float(c)) for c in levels_of(args.concurrency)] + \
           [("q", float(q)) for q in args.rates.split(",") if q]


def benchmark(state: dict[str, Any], args: argparse.Namespace, result_dir: Path, deadline: float) -> None:
    result_dir.mkdir(parents=True, exist_ok=True)
    logs = result_dir / "logs"
    logs.mkdir(exist_ok=True)
    sides = tuple(state["sides"])
    names = [f"{side}-{kind}{value:g}-r{r}" for r in range(args.rounds) for kind, value in run_levels(args)
             for side in sides]
    if all((result_dir / f"{name}.json").is_file() for name in names):  # a --reuse call with nothing left to do
        print(f"every run of rounds 0-{args.rounds - 1} is already in {result_dir}: nothing measured "
              f"(--rounds {args.rounds + 1} adds a round)")
        return
    for side in sides:  # warm-up, not counted: first requests, tokenizer caches, lazily built paths
        run_bench(bench_command(side, state, 8, 16, args, logs, f"warmup-{side}.json"), logs / f"warmup-{side}.log")
    rate_concurrency = max(levels_of(args.concurrency))
    for r in range(args.rounds):
        for i, (kind, value) in enumerate(run_levels(args)):
            order = sides if (i + r) % 2 == 0 else sides[::-1]
            for side in order:
                name = f"{side}-{kind}{value:g}-r{r}"
                if (result_dir / f"{name}.json").is_file():
                    continue  # done by an earlier call (--reuse)
                if time.monotonic() > deadline:
                    print(f"deadline reached: {name} and later runs not done (rerun with --reuse)")
                    return
                started = time.monotonic()
                if kind == "c":
                    command = bench_command(side, state, int(value), prompts_for(int(value), args), args, result_dir,
                                            f"{name}.json")
                else:  # arrivals at `value` per second (Poisson), at most the highest concurrency level at once
                    command = bench_command(side, state, rate_concurrency, max(args.min_prompts, int(value * 10)),
                                            args, result_dir, f"{name}.json", rate=value)
                before = batching(state, side)
                run_bench(command, logs / f"{name}.log")
                s = summarize(json.loads((result_dir / f"{name}.json").read_text()))
                joins = ""
                if before is not None and (after := batching(state, side)) is not None:
                    delta = {k: after.get(k, 0) - before.get(k, 0) for k in BATCHING_COUNTERS}
                    delta["static_steps_by_rows"] = {
                        rows: steps - before.get("static_steps_by_rows", {}).get(rows, 0)
                        for rows, steps in after.get("static_steps_by_rows", {}).items()}
                    (result_dir / f"{name}-batching.json").write_text(json.dumps(delta, indent=2))
                    joins = (f"; {delta['waves']} waves, {delta['joined_running_wave']} joined in "
                             f"{delta['join_prefills']} prefills")
                print(f"{name}: {s['output_throughput']:.0f} tok/s, TTFT p50 {s['ttft_p50']:.1f} ms, TPOT p50 "
                      f"{s['tpot_p50']:.2f} ms ({time.monotonic() - started:.0f} s){joins}", flush=True)


#: The transformers engine's counters (GET /v1/engine's "batching") whose change over one run is saved beside it.
BATCHING_COUNTERS = ("waves", "joined_running_wave", "join_prefills", "wave_shifts", "forward_passes")


def batching(state: dict[str, Any], side: str) -> dict[str, Any] | None:
    """An hf side's batching counters now (None for the vLLM sides, or when the server does not answer)."""
    found = engine_info(state["servers"][side]["port"]).get("batching") if side in HF_SIDES else None
    return found if isinstance(found, dict) else None


def engine_info(port: int) -> dict[str, Any]:
    """A Jarvis server's GET /v1/engine ({} when it does not answer with JSON)."""
    try:
        found = httpx.get(f"http://127.0.0.1:{port}/v1/engine", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--shape", choices=SHAPES, default="gemma3-270m")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (or .json.gz) and "
                        "tokenizer_config.json; default: the embedded model's converted tokenizer")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_serving",
                        help="where the model, logs and results go (default: %(default)s)")
    parser.add_argument("--sides", default="raw,jarvis", help="servers to compare, comma-separated, raw first: raw "
                        "(vllm serve), jarvis (Jarvis's vllm engine), hf (Jarvis's transformers engine, its defaults), "
                        "hf-waves (its wave scheduler), hf-continuous (transformers' continuous batching), hf-graphs "
                        "(continuous batching with CUDA graphs)")
    parser.add_argument("--gguf", type=Path, help="real weights: a GGUF file (the embedded model's) converted on the "
                        "host with `jarvis models convert`; default: random weights of --shape")
    parser.add_argument("--concurrency", default="1,16,64,256", help="levels, comma-separated")
    parser.add_argument("--rates", default="", help="request rates per second (Poisson arrivals), comma-separated, "
                        "each at most the highest --concurrency at once")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--waves", type=int, default=16, help="prompts per level = max(min-prompts, waves × C); 4 "
                        "waves of Gemma-270M at C=16 last 1.3 s on an H100 and vary ±10 %% between rounds")
    parser.add_argument("--min-prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="sweeps over the levels (median of rounds)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="each server's share")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--adapters", type=int, default=0, help="multi-LoRA: N random adapters, each request to one "
                        "of them at random (0: the base model only)")
    parser.add_argument("--lora-rank", type=int, default=16, help="the --adapters adapters' rank")
    parser.add_argument("--raw-flags", choices=("defaults", "planned"), default="defaults",
                        help="vllm serve with its own defaults, or with the engine arguments Jarvis plans")
    parser.add_argument("--set", action="append", default=[], metavar="JARVIS_VLLM_X=V",
                        help="another Jarvis setting, for both servers (it changes the planned engine arguments)")
    parser.add_argument("--set-hf", action="append", default=[], metavar="JARVIS_HF_X=V",
                        help="another setting of the hf side")
    parser.add_argument("--hf-max-batch-size", type=int, default=None,
                        help="the hf sides' JARVIS_HF_MAX_BATCH_SIZE (default: the highest level, at least 64)")
    parser.add_argument("--hf-kv-cache-memory", type=float, default=0.5,
                        help="the hf side's share of the GPU memory the vLLM servers leave (default %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=420)
    parser.add_argument("--budget", type=float, default=540, help="seconds; no new bench run starts after it")
    parser.add_argument("--keep-servers", action="store_true", help="leave both servers running at the end")
    parser.add_argument("--reuse", action="store_true", help="use the servers a --keep-servers run left")
    parser.add_argument("--measure", type=lambda v: tuple(v.split(",")), default=None,
                        help="with --reuse: measure only these of the running servers, raw first (e.g. raw,jarvis "
                             "at a level above the hf server's rows)")
    parser.add_argument("--stop", action="store_true", help="stop the servers a --keep-servers run left, and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    parser.add_argument("--report", type=Path, metavar="DIR", help="print the table from saved results only")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="a folder for results.tgz (default: $OUT when set)")
    args = parser.parse_args(argv)
    for kv in args.set + args.set_hf:
        if "=" not in kv or not kv.startswith("JARVIS_"):
            parser.error(f"--set and --set-hf take JARVIS_NAME=VALUE, not {kv!r}")
    try:
        levels = levels_of(args.concurrency)
        rates = [float(q) for q in args.rates.split(",") if q]
    except ValueError:
        parser.error("--concurrency takes integers and --rates numbers, separated by commas")
    if not levels or min(levels) < 1 or any(q <= 0 for q in rates):
        parser.error("--concurrency levels must be ≥ 1 and --rates above 0")
    args.sides = tuple(args.sides.split(","))
    if args.sides[0] != "raw" or len(args.sides) < 2 or not set(args.sides) <= set(SIDES):
        parser.error(f"--sides is raw and one or more of {', '.join(SIDES[1:])}, raw first")
    return args


def print_report(result_dir: Path, weights: int | None, output_len: int) -> None:
    results = load_results(result_dir)
    present = {side for sides in results.values() for side in sides}
    for side in SIDES[1:]:
        if side in present:
            print("\n" + ratio_table(results, side))
    print("\n" + goals(results, weights, output_len))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        meta = json.loads((args.report / "meta.json").read_text()) if (args.report / "meta.json").is_file() else {}
        print_report(args.report, meta.get("weight_bytes"), meta.get("output_len", args.output_len))
        return
    started = time.monotonic()
    label = "gemma-3-270m" if args.gguf else args.shape
    work = args.work / label
    work.mkdir(parents=True, exist_ok=True)
    name = label if args.gguf else f"random-{args.shape}"
    folder = work / name
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / name
            probe.mkdir()
            (probe / "config.json").write_text(json.dumps(shape_config(args.shape, 262144, 2, 1)))
            settings = all_settings(folder, name, args)
            engine_args, env = planned(settings["jarvis"], probe, assume_h200=True)
        print(f"engine arguments (planned for one H200): {json.dumps(engine_args)}\nenvironment: {env}")
        for side, (command, extra) in commands(folder, name, engine_args, settings, work,
                                               {s: 8001 + i for i, s in enumerate(args.sides)}, args).items():
            print(f"{side}: {' '.join(f'{k}={v}' for k, v in extra.items())} {' '.join(command)}")
        state = {"servers": {s: {"port": p} for s, p in (("raw", 8001), ("jarvis", 8002))}, "model": str(folder),
                 "name": name}
        print("bench:", " ".join(bench_command("raw", state, 16, prompts_for(16, args), args, work, "raw-c16-r0.json")))
        return
    state_file = work / "state.json"
    if args.stop:
        if state_file.is_file():
            stop_servers(json.loads(state_file.read_text()))
            state_file.unlink()
        return
    if args.reuse and state_file.is_file():
        state = json.loads(state_file.read_text())
        wait_ready(state, 30)
        pids = ", ".join(f"{side} pid {server['pid']}" for side, server in state["servers"].items())
        print(f"reusing servers: {pids}")
        if args.measure:  # a subset of the running servers
            if args.measure[0] != "raw" or not set(args.measure) <= set(state["sides"]):
                sys.exit(f"--measure is raw and some of the running {', '.join(state['sides'][1:])}, raw first")
            state["sides"] = list(args.measure)
        check_reused_batch(state, args)
    else:
        if args.gguf:
            convert_gguf(args.gguf, folder, tokenizer_folder(args.tokenizer, work) if args.tokenizer else None)
        else:
            source = args.tokenizer or Path.home() / ".cache" / "jarvis" / "models" / "gemma-3-270m-hf"
            make_model(args.shape, tokenizer_folder(source, work), folder)
        if args.adapters:
            make_adapters(folder, adapter_folders(folder, args), args.lora_rank)
        settings = all_settings(folder, name, args)
        engine_args, env = planned(settings["jarvis"], folder, assume_h200=False)
        print(f"engine arguments, both vLLM servers: {json.dumps(engine_args)}")
        state = start_servers(folder, name, engine_args, env, settings, work, args)
    state["adapters"] = list(adapter_folders(folder, args))
    result_dir = work / ("results" if not args.adapters else f"results-{args.adapters}-adapters")
    if not args.reuse and result_dir.is_dir():  # runs of other server instances: kept aside, never mixed in
        earlier = result_dir.with_name(f"{result_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        result_dir.rename(earlier)
        print(f"the runs of earlier servers are kept in {earlier}: this call measures every side anew")
    result_dir.mkdir(exist_ok=True)
    report = parity(state)
    (result_dir / "parity.json").write_text(json.dumps(report, indent=2, default=str))
    jarvis_engine = report.get("jarvis_engine")
    print("parity: max_num_batched_tokens in the logs", report["max_num_batched_tokens"],
          "| vLLM engine config identical:", report.get("engine_config_identical"),
          "| only raw:", report.get("only_raw"), "| only jarvis:", report.get("only_jarvis"))
    print("KV cache tokens:", report["kv_cache_tokens"])
    unfair = kv_mismatch(report["kv_cache_tokens"])
    if unfair:
        if args.keep_servers or args.reuse:
            raise SystemExit(f"{unfair}; stop the servers (--stop) and start them again")
        stop_servers(state)
        raise SystemExit(f"{unfair}; the servers are stopped: run again")
    if isinstance(jarvis_engine, dict):
        print("jarvis /v1/engine:", json.dumps({k: jarvis_engine.get(k) for k in
                                                 ("engine_args", "usage_context", "engine_resolved")}))
    state["ignore_eos"], answer = jarvis_takes_ignore_eos(state)
    if not state["ignore_eos"]:
        print(f"Jarvis refuses ignore_eos ({answer}): both sides run without it, on the same random-token prompts "
              "from a file (vllm bench's random dataset always sends it); the check below says whether any run "
              "produced fewer output tokens than asked")
        most = max(prompts_for(int(c), args) for c in args.concurrency.split(","))
        state["prompts"] = random_prompts(Path(state["model"]), most, args.input_len, work / "prompts.jsonl")
    weights = weight_bytes(Path(state["model"]))
    if args.gguf:  # the converted folder is float32; every side serves it in bf16
        weights //= 2
    (result_dir / "meta.json").write_text(json.dumps({
        "shape": label, "sides": state["sides"], "weight_bytes": weights, "engine_args": state["engine_args"],
        "input_len": args.input_len, "output_len": args.output_len, "concurrency": args.concurrency,
        "ignore_eos": state["ignore_eos"], "adapters": state["adapters"], "lora_rank": args.lora_rank,
        "raw_flags": args.raw_flags}, indent=2))
    try:
        benchmark(state, args, result_dir, started + args.budget)
    finally:
        if not args.keep_servers:
            stop_servers(state)
        (result_dir / "logs").mkdir(exist_ok=True)
        for side, server in state["servers"].items():
            shutil.copy(server["log"], result_dir / "logs" / f"server-{side}.log")
        if args.out:
            pack(result_dir, args.out / f"gpu_serving-{label}-{'-'.join(state['sides'])}.tgz", f"{label}-results")
        print(f"\n{label}, vllm {vllm_version()}, engine arguments (vLLM sides): {json.dumps(state['engine_args'])}")
        print_report(result_dir, weights, args.output_len)


def pack(result_dir: Path, archive: Path, name: str) -> None:
    """The results folder as one .tgz, less each run's generated texts (random tokens that hardly compress: two
    thirds of the archive), so three sides' rounds stay under what a remote machine sends back (16 MiB a file)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(result_dir.rglob("*")):
            arcname = f"{name}/{path.relative_to(result_dir)}"
            if path.suffix != ".json" or not path.is_file():
                tar.add(path, arcname=arcname, recursive=False)
                continue
            run = json.loads(path.read_text())
            if isinstance(run, dict) and "generated_texts" in run:
                run["generated_texts"] = f"{len(run['generated_texts'])} texts, left out of the archive"
            data = json.dumps(run).encode()
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))


def vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:  # noqa: BLE001 - only for the report line
        return "?"


if __name__ == "__main__":
    main()
