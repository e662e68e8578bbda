"""Where and in what precision torch runs: JARVIS_DEVICE and JARVIS_DTYPE resolved for this machine.

The transformers engine, training and evaluation load models with torch the same way, so `auto` means the same
device and dtype everywhere, and a setting this machine cannot honour is a ConfigError naming the fix. torch is
imported inside the functions only.
"""

from __future__ import annotations

from typing import Any

from jarvis.errors import ConfigError

#: JARVIS_DTYPE's spellings → torch's dtype names.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_device(setting: str) -> str:
    """JARVIS_DEVICE as a torch device: `auto` is CUDA when torch sees one, else the CPU."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("JARVIS_DEVICE", setting, "no CUDA device is visible to torch",
                          "set JARVIS_DEVICE=cpu (or auto), or install a CUDA build of torch on a GPU host")
    return setting


def resolve_dtype(setting: str, device: str) -> Any:
    """JARVIS_DTYPE as a torch dtype on `device`: `auto` is bfloat16 on a CUDA device that has it, else float32."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    dtype = getattr(torch, DTYPES[setting])
    if dtype is torch.float16 and device == "cpu":
        raise ConfigError("JARVIS_DTYPE", setting, "float16 matmuls are not supported well on CPU",
                          "set JARVIS_DTYPE=bf16 or fp32 on CPU, or use a CUDA device")
    return dtype
