"""Merge a PEFT LoRA adapter into its base model: a full transformers folder, cached by content hash.

Serving one adapter merged costs nothing per token (no LoRA matmuls), which is
why the vLLM engine can serve `JARVIS_VLLM_MERGE_ADAPTER` this way and why
`jarvis adapters merge` exists. The cache key covers the adapter's files and
the base folder's weights, so a retrained adapter is merged again, and an
unfinished merge never looks done (the folder is renamed into place at the end).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

MARKER = "jarvis-merge.json"


def merge_key(base: Path, adapter: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in adapter.iterdir() if p.is_file() and p.name.startswith("adapter_")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    for f in sorted(base.glob("*.safetensors")):  # the base by identity: path, size and mtime of its weights
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def merge_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """Write base + adapter, merged, as a float32 transformers folder at `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"base": str(base), "adapter": str(adapter),
                                              "seconds": round(time.monotonic() - started, 1)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def merged_model(base: Path, adapter: Path, cache_root: Path) -> Path:
    """The merged folder for (base, adapter) under `cache_root`, merging only when it is not cached."""
    out = cache_root / f"{adapter.name}-{merge_key(base, adapter)}"
    if not (out / MARKER).is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        merge_adapter(base, adapter, out)
    return out
