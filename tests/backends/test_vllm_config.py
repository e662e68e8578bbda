"""vLLM configuration: settings → engine arguments, and the problems found before a minute is spent loading.

`Platform` is the list of facts about a machine (GPUs and their memory, NUMA
nodes, RAM); the cases below describe real machine shapes (one H100, an 8-GPU
node, this CPU host) and check the plan Jarvis would hand vLLM on each.
"""

from __future__ import annotations

import json

import pytest

from jarvis.backends.vllm_config import LORA_RANKS, Platform, VllmSettings, plan_engine
from jarvis.settings import load_settings

pytestmark = pytest.mark.usefixtures("vllm_installed")

H100 = Platform("cuda", (79.6,), numa_nodes=1, ram_gib=1000)
EIGHT_H200 = Platform("cuda", (139.8,) * 8, numa_nodes=2, ram_gib=2000)
CPU_HOST = Platform("cpu", (), numa_nodes=1, ram_gib=20)


@pytest.fixture
def model_dir(tmp_path):
    """A model folder as save_pretrained writes it: config.json and 2 GiB of bf16 weights (sparse file)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 32,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}))
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(2 * 2**30)
    return folder


def plan(model_dir, platform, monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return plan_engine(load_settings(), load_settings(VllmSettings, prefix="JARVIS_VLLM_"), platform, model_dir)


def settings_named(result) -> list[str]:
    return [p.setting for p in result.problems]


def test_single_gpu_defaults(model_dir, monkeypatch):
    result = plan(model_dir, H100, monkeypatch)
    assert result.problems == []
    args = result.engine_args
    assert args["model"] == str(model_dir) and args["tensor_parallel_size"] == 1
    assert args["gpu_memory_utilization"] == 0.9 and args["enforce_eager"] is False
    assert args["enable_lora"] is True and args["max_lora_rank"] == 64  # JARVIS_MAX_LORA_RANK's default
    assert result.env["VLLM_HOST_IP"] == "127.0.0.1"


def test_parallel_layout_larger_than_the_visible_gpus(model_dir, monkeypatch):
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_TENSOR_PARALLEL_SIZE="4")
    (problem,) = result.problems
    assert problem.setting == "JARVIS_VLLM_TENSOR_PARALLEL_SIZE"
    assert "1 are visible" in problem.problem
    assert "JARVIS_VLLM_TENSOR_PARALLEL_SIZE=1" in problem.fix and "JARVIS_INFERENCE_ENGINE=hf" in problem.fix


def test_pipeline_across_nodes_needs_ray(model_dir, monkeypatch):
    result = plan(model_dir, EIGHT_H200, monkeypatch, JARVIS_VLLM_TENSOR_PARALLEL_SIZE="8",
                  JARVIS_VLLM_PIPELINE_PARALLEL_SIZE="2")
    (problem,) = result.problems
    assert problem.setting == "JARVIS_VLLM_PIPELINE_PARALLEL_SIZE" and "need Ray" in problem.problem
    assert "ray start --head" in problem.fix and "JARVIS_VLLM_DISTRIBUTED_EXECUTOR=ray" in problem.fix


def test_ray_executor_without_a_reachable_cluster(model_dir, monkeypatch):
    result = plan(model_dir, EIGHT_H200, monkeypatch, JARVIS_VLLM_DISTRIBUTED_EXECUTOR="ray")
    (problem,) = result.problems
    assert problem.setting == "JARVIS_VLLM_DISTRIBUTED_EXECUTOR"
    assert "pip install" in problem.fix or "ray start" in problem.fix  # not installed here, or no cluster


def test_heads_must_split_evenly(model_dir, monkeypatch):
    result = plan(model_dir, EIGHT_H200, monkeypatch, JARVIS_VLLM_TENSOR_PARALLEL_SIZE="3")
    assert settings_named(result) == ["JARVIS_VLLM_TENSOR_PARALLEL_SIZE"]
    assert "32 attention heads" in result.problems[0].problem


def test_weights_that_do_not_fit(model_dir, monkeypatch):
    small = Platform("cuda", (4.0,), ram_gib=64)
    result = plan(model_dir, small, monkeypatch, JARVIS_VLLM_GPU_MEMORY_UTILIZATION="0.3")
    (problem,) = result.problems
    assert problem.setting == "JARVIS_VLLM_GPU_MEMORY_UTILIZATION" and "2.0 GiB" in problem.problem
    assert plan(model_dir, small, monkeypatch, JARVIS_VLLM_GPU_MEMORY_UTILIZATION="0.9").problems == []


@pytest.mark.parametrize("quantization, expected", [("fp8", {"quantization": "fp8"}), ("bf16", {}), ("none", {})])
def test_quantization_names_map_to_what_vllm_accepts(model_dir, monkeypatch, quantization, expected):
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_QUANTIZATION=quantization)
    assert result.problems == []
    assert {k: v for k, v in result.engine_args.items() if k == "quantization"} == expected
    if quantization == "bf16":
        assert result.engine_args["dtype"] == "bfloat16"


def test_int4_needs_a_quantized_checkpoint(model_dir, monkeypatch):
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_QUANTIZATION="int4")
    (problem,) = result.problems
    assert "no quantization_config" in problem.problem and "fp8" in problem.fix
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_QUANTIZATION="int4")
    assert result.problems == [] and result.engine_args["quantization"] == "awq"


def test_cpu_host(model_dir, monkeypatch):
    result = plan(model_dir, CPU_HOST, monkeypatch, JARVIS_VLLM_CPU_KVCACHE_SPACE="2")
    assert result.problems == []
    assert result.engine_args["dtype"] == "float32" and result.engine_args["enforce_eager"] is True
    assert "gpu_memory_utilization" not in result.engine_args
    assert result.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    result = plan(model_dir, CPU_HOST, monkeypatch, JARVIS_VLLM_QUANTIZATION="fp8", JARVIS_DTYPE="fp16",
                  JARVIS_VLLM_TENSOR_PARALLEL_SIZE="2")
    assert sorted(settings_named(result)) == ["JARVIS_DTYPE", "JARVIS_VLLM_QUANTIZATION",
                                              "JARVIS_VLLM_TENSOR_PARALLEL_SIZE"]


def test_cpu_kv_cache_is_sized_from_the_model_and_the_memory_free(model_dir, monkeypatch):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(num_hidden_layers=32, num_key_value_heads=8, head_dim=128)  # 256 KiB per float32 token
    (model_dir / "config.json").write_text(json.dumps(config))
    context = 256 * 2**10 * 4096  # one 4096-token context: 1 GiB
    roomy = plan(model_dir, CPU_HOST, monkeypatch)  # 20 GiB free: 8 contexts
    assert roomy.problems == [] and roomy.engine_args["kv_cache_memory_bytes"] == 8 * context
    assert "VLLM_CPU_KVCACHE_SPACE" not in roomy.env
    # a laptop with a browser open: 9 GiB available, 4 GiB of float32 weights, 1.5 GiB headroom -> 3.5 GiB
    busy = plan(model_dir, Platform("cpu", (), ram_gib=9), monkeypatch)
    assert busy.problems == [] and busy.engine_args["kv_cache_memory_bytes"] == int(3.5 * 2**30)
    full = plan(model_dir, Platform("cpu", (), ram_gib=6), monkeypatch)  # not even one context fits
    assert settings_named(full) == ["JARVIS_MAX_MODEL_LEN"] and "1.00 GiB of KV cache" in full.problems[0].problem
    assert plan(model_dir, Platform("cpu", (), ram_gib=6), monkeypatch, JARVIS_MAX_MODEL_LEN="1024").problems == []
    monkeypatch.delenv("JARVIS_MAX_MODEL_LEN")
    assert plan(model_dir, CPU_HOST, monkeypatch, JARVIS_VLLM_MAX_NUM_SEQS="2").engine_args[
        "kv_cache_memory_bytes"] == 2 * context


def test_lora_ranks(model_dir, monkeypatch):
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_MAX_LORA_RANK="12")
    assert settings_named(result) == ["JARVIS_VLLM_MAX_LORA_RANK"]
    assert ", ".join(map(str, LORA_RANKS)) in result.problems[0].problem
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_MAX_LORA_RANK="16", JARVIS_MAX_LORA_RANK="32")
    assert settings_named(result) == ["JARVIS_VLLM_MAX_LORA_RANK"]
    assert "JARVIS_MAX_LORA_RANK ≤ 16" in result.problems[0].fix
    monkeypatch.delenv("JARVIS_VLLM_MAX_LORA_RANK")
    assert plan(model_dir, H100, monkeypatch, JARVIS_MAX_LORA_RANK="100").engine_args["max_lora_rank"] == 128
    off = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_ENABLE_LORA="false", JARVIS_LORA_MODULES="a=/x")
    assert settings_named(off) == ["JARVIS_VLLM_ENABLE_LORA"]


def test_context_longer_than_trained(model_dir, monkeypatch):
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_MAX_MODEL_LEN="16384")
    assert settings_named(result) == ["JARVIS_VLLM_MAX_MODEL_LEN"] and "8192" in result.problems[0].fix
