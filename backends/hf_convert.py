"""GGUF → transformers folder, once: how the HF (and vLLM) engines serve the embedded model.

transformers reads GGUF (`gguf_file=`), de-quantizing the weights; the result
is saved as a safetensors folder in float32 (the de-quantized values exactly,
so the HF engine computes with the same weights llama.cpp does). A marker
file records the source's sha256; an unfinished conversion never looks done
because the folder is renamed into place only at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from jarvis.embedded_model import MODEL_ID, embedded_model_path, sha256_of

MARKER = "jarvis-conversion.json"


def converted_dir(data_dir: Path) -> Path:
    return data_dir / "models" / f"{MODEL_ID}-hf"


def is_converted(folder: Path, source_sha256: str | None = None) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    return source_sha256 is None or json.loads(marker.read_text()).get("source_sha256") == source_sha256


def convert_gguf(gguf: Path, out_dir: Path, *, source_sha256: str | None = None) -> Path:
    """Write `out_dir` (config, tokenizer, float32 safetensors) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = source_sha256 or sha256_of(gguf)
    if is_converted(out_dir, digest):
        return out_dir
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A model read from GGUF carries a GGUF "quantizer" that refuses save_pretrained; the weights
    # are already de-quantized, so the folder is an ordinary float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({
        "source": str(gguf), "source_sha256": digest, "dtype": "float32",
        "seconds": round(time.monotonic() - started, 1)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def embedded_hf_model(data_dir: Path) -> Path:
    """The embedded model as a transformers folder, converting it on first use."""
    folder = converted_dir(data_dir)
    gguf = embedded_model_path(data_dir)
    stamp = json.loads(gguf.with_name(gguf.name + ".verified").read_text())
    return convert_gguf(gguf, folder, source_sha256=stamp["sha256"])
