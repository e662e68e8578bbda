"""PEFT LoRA folder → GGUF LoRA file, so the llama.cpp engine serves the adapters PEFT trains.

llama.cpp reads LoRA adapters as GGUF files whose tensors are named after the
base model's GGUF tensors (`blk.0.attn_q.weight.lora_a` / `.lora_b`). The
`gguf` package's tensor-name map translates the transformers module names a
PEFT adapter uses; A (rank × in) and B (out × rank) are written unchanged in
float32, with `adapter.lora.alpha` so llama.cpp scales by alpha / rank as PEFT
does. Converted files are cached by the adapter's content hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jarvis.adapters import AdapterInfo, InvalidAdapter

SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"}


def adapter_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def gguf_lora_tensors(adapter: AdapterInfo, arch: str, n_blocks: int) -> dict[str, object]:
    """GGUF tensor name → float32 array, for every LoRA matrix of the PEFT adapter."""
    import gguf
    from safetensors.numpy import load_file

    weights = Path(adapter.path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise InvalidAdapter(f"the llama_cpp engine converts PEFT adapters saved as safetensors; "
                             f"{adapter.path} has none (save with safe_serialization=True)")
    arch_ids = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in arch_ids:
        raise InvalidAdapter(f"llama.cpp's gguf package knows no architecture {arch!r}")
    names = gguf.get_tensor_name_map(arch_ids[arch], n_blocks)
    tensors = {}
    for key, array in load_file(str(weights)).items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise InvalidAdapter(f"adapter tensor {key!r} is not a LoRA A/B matrix; llama.cpp serves plain LoRA "
                                 "(no DoRA magnitudes, no trained modules_to_save)")
        module = key[: -len(suffix)].removeprefix("base_model.model.")
        target = names.get_name(module)
        if target is None:
            raise InvalidAdapter(f"adapter module {module!r} has no {arch} tensor in llama.cpp: the adapter was "
                                 "trained for another model", code="adapter_load_failed")
        tensors[f"{target}.weight.{SUFFIXES[suffix]}"] = array.astype("float32")
    if not tensors:
        raise InvalidAdapter(f"{weights} holds no LoRA tensors")
    return tensors


def convert_peft_to_gguf(adapter: AdapterInfo, arch: str, n_blocks: int, cache_dir: Path) -> Path:
    import gguf

    if adapter.use_dora:
        raise InvalidAdapter(f"adapter {adapter.name!r} is a DoRA adapter; llama.cpp serves plain LoRA only "
                             "(serve it with JARVIS_INFERENCE_ENGINE=hf, or merge it with `jarvis adapters merge`)")
    out = cache_dir / f"{adapter.name}-{adapter_digest(Path(adapter.path))}.gguf"
    if out.is_file():
        return out
    tensors = gguf_lora_tensors(adapter, arch, n_blocks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
    return out
