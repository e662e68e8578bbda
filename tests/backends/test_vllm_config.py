"""vLLM configuration: settings → engine arguments, and the problems found before a minute is spent loading.

`Platform` is the list of facts about a machine (GPUs and their memory, NUMA
nodes, RAM); the cases below describe real machine shapes (one H100, an 8-GPU
node, this CPU host) and check the plan Jarvis would hand vLLM on each.
"""

from __future__ import annotations

import json

import pytest

from jarvis.backends.vllm.config import LORA_RANKS, Platform, VllmSettings, plan_engine
from jarvis.settings import SettingsError, load_settings

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


TUNING_ARGS = ("max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill", "cudagraph_capture_sizes",
               "kv_cache_dtype", "speculative_config", "max_num_seqs")


def test_unset_tuning_knobs_leave_vllms_defaults(model_dir, monkeypatch):
    """Unset, none is passed, so vLLM picks what `vllm serve` picks (by the usage context Jarvis starts it with)."""
    for device in (H100, CPU_HOST):
        args = plan(model_dir, device, monkeypatch, JARVIS_VLLM_CPU_KVCACHE_SPACE="2").engine_args
        assert not set(TUNING_ARGS) & set(args)


def test_tuning_knobs_reach_the_engine_arguments(model_dir, monkeypatch):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS="8192",
                  JARVIS_VLLM_ENABLE_PREFIX_CACHING="false", JARVIS_VLLM_ENABLE_CHUNKED_PREFILL="true",
                  JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES="16, 1,2,4,8,8", JARVIS_VLLM_KV_CACHE_DTYPE="fp8",
                  JARVIS_VLLM_SPECULATIVE_CONFIG=json.dumps(spec), JARVIS_VLLM_MAX_NUM_SEQS="64",
                  JARVIS_VLLM_ENFORCE_EAGER="false")
    assert result.problems == []
    args = result.engine_args
    assert {k: args[k] for k in TUNING_ARGS} == {
        "max_num_batched_tokens": 8192, "enable_prefix_caching": False, "enable_chunked_prefill": True,
        "cudagraph_capture_sizes": [1, 2, 4, 8, 16], "kv_cache_dtype": "fp8", "speculative_config": spec,
        "max_num_seqs": 64}
    assert args["enforce_eager"] is False
    from vllm import AsyncEngineArgs

    AsyncEngineArgs(**args)  # every name is one vLLM's engine arguments take
    assert plan(model_dir, H100, monkeypatch, JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES="[1, 32]").engine_args[
        "cudagraph_capture_sizes"] == [1, 32]


@pytest.mark.parametrize("value", ["0,8", "1,two", "[1,", "[]"])
def test_capture_sizes_that_are_not_positive_integers(model_dir, monkeypatch, value):
    with pytest.raises(SettingsError) as caught:
        plan(model_dir, H100, monkeypatch, JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES=value)
    assert {p.setting for p in caught.value.problems} == {"JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES"}
    assert "1,2,4,8" in caught.value.problems[0].fix


def test_capture_sizes_need_cuda_graphs(model_dir, monkeypatch):
    cpu = plan(model_dir, CPU_HOST, monkeypatch, JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES="1,2",
               JARVIS_VLLM_CPU_KVCACHE_SPACE="2")
    assert settings_named(cpu) == ["JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES"] and "CUDA GPU" in cpu.problems[0].problem
    eager = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_ENFORCE_EAGER="true")
    assert settings_named(eager) == ["JARVIS_VLLM_CUDAGRAPH_CAPTURE_SIZES"]
    fix = eager.problems[0].fix
    assert "JARVIS_VLLM_ENFORCE_EAGER" in fix and "JARVIS_INFERENCE_ENGINE=hf" in fix


@pytest.mark.parametrize("device, value, ok", [
    (H100, "fp8", True), (H100, "fp8_e5m2", True), (H100, "bfloat16", True), (H100, "auto", True),
    (H100, "fp4", False), (CPU_HOST, "fp8", True), (CPU_HOST, "bfloat16", False), (CPU_HOST, "fp8_inc", False)])
def test_kv_cache_dtypes_the_device_takes(model_dir, monkeypatch, device, value, ok):
    result = plan(model_dir, device, monkeypatch, JARVIS_VLLM_KV_CACHE_DTYPE=value, JARVIS_VLLM_CPU_KVCACHE_SPACE="2")
    if ok:
        assert result.problems == [] and result.engine_args["kv_cache_dtype"] == value
        return
    assert settings_named(result) == ["JARVIS_VLLM_KV_CACHE_DTYPE"] and "kv_cache_dtype" not in result.engine_args
    problem = result.problems[0]
    assert ("CPU" if device is CPU_HOST else "CUDA") in problem.problem and "auto, " in problem.fix
    if value == "bfloat16":
        assert "needs a CUDA GPU" in problem.problem


def test_batched_tokens_against_the_context_and_the_sequences(model_dir, monkeypatch):
    off = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS="1024",
               JARVIS_VLLM_ENABLE_CHUNKED_PREFILL="false", JARVIS_MAX_MODEL_LEN="4096")
    assert settings_named(off) == ["JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS"] and "at least 4096" in off.problems[0].fix
    monkeypatch.delenv("JARVIS_VLLM_ENABLE_CHUNKED_PREFILL")  # chunked prefill (vLLM's default): any size works
    assert plan(model_dir, H100, monkeypatch).problems == []
    few = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS="128", JARVIS_VLLM_MAX_NUM_SEQS="256")
    assert settings_named(few) == ["JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS"] and "at least 256" in few.problems[0].fix
    with pytest.raises(SettingsError) as caught:
        plan(model_dir, H100, monkeypatch, JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS="0")
    assert caught.value.problems[0].setting == "JARVIS_VLLM_MAX_NUM_BATCHED_TOKENS"


@pytest.mark.parametrize("spec, problem", [
    ({"num_speculative_tokens": 4}, "neither a method nor a draft model"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "eagle3", "model": "/nonexistent/draft", "num_speculative_tokens": 3}, "no config.json"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "integer ≥ 1"),
])
def test_speculative_configs_that_cannot_work(model_dir, monkeypatch, spec, problem):
    result = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_SPECULATIVE_CONFIG=json.dumps(spec))
    assert settings_named(result) == ["JARVIS_VLLM_SPECULATIVE_CONFIG"] and problem in result.problems[0].problem
    assert "speculative_config" not in result.engine_args


def test_speculative_config_must_be_a_json_object(model_dir, monkeypatch):
    for value in ('{"method": "ngram",', '["ngram"]'):
        with pytest.raises(SettingsError) as caught:
            plan(model_dir, H100, monkeypatch, JARVIS_VLLM_SPECULATIVE_CONFIG=value)
        assert caught.value.problems[0].setting == "JARVIS_VLLM_SPECULATIVE_CONFIG"
    draft = plan(model_dir, H100, monkeypatch, JARVIS_VLLM_SPECULATIVE_CONFIG=json.dumps(
        {"model": str(model_dir), "num_speculative_tokens": 2}))
    assert draft.problems == [] and draft.engine_args["speculative_config"]["model"] == str(model_dir)


def test_the_installed_vllm_takes_the_usage_context_vllm_serve_uses():
    """Jarvis starts its engine as `vllm serve` does: AsyncLLMEngine.from_engine_args(..., usage_context=...)."""
    import inspect

    from vllm import AsyncLLMEngine
    from vllm.usage.usage_lib import UsageContext

    assert UsageContext.OPENAI_API_SERVER.value == "OPENAI_API_SERVER"
    assert "usage_context" in inspect.signature(AsyncLLMEngine.from_engine_args).parameters
