"""LoRA adapters, engine-neutral: validation of PEFT folders and the persisted set of served adapters.

`inspect_adapter` accepts a folder only if it is inside the adapter root (after
resolving symlinks), holds `adapter_config.json` and weights, is a LoRA, and
its rank fits the engine's limit; otherwise `InvalidAdapter` (a 400) says
why. `AdapterStore` keeps name → path in a JSON file in the data dir, so a
restarted server serves the same adapters.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jarvis.errors import InvalidRequest

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class InvalidAdapter(InvalidRequest):
    def __init__(self, message: str, code: str = "invalid_adapter") -> None:
        super().__init__(message, param="lora_path", code=code)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    base_model: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    use_dora: bool = False
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    def public(self) -> dict[str, Any]:
        return asdict(self)


def confine(path: str | Path, root: Path) -> Path:
    """The real path of `path`, which must lie inside `root` (no `..`, no symlink escape)."""
    real_root = root.expanduser().resolve()
    try:
        str(path).encode("utf-8")  # lone surrogates cannot name a file
        if "\0" in str(path):
            raise ValueError("embedded NUL byte")
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = real_root / candidate
        real = candidate.resolve()
    except (ValueError, UnicodeError, OSError, RuntimeError) as exc:  # NUL, bad encoding, a symlink loop
        raise InvalidAdapter(f"adapter path {str(path)!r} is not a usable path: {exc}",
                             code="invalid_path") from None
    if real != real_root and real_root not in real.parents:
        raise InvalidAdapter(f"adapter path {str(path)!r} is outside the adapter root {str(real_root)!r}; "
                             f"put the adapter under it or set JARVIS_ADAPTER_ROOT", code="path_outside_root")
    return real


def inspect_adapter(name: str, path: str | Path, root: Path, max_rank: int) -> AdapterInfo:
    folder = confine(path, root)
    if not folder.is_dir():
        raise InvalidAdapter(f"adapter path {str(path)!r} is not a folder (expected a PEFT adapter folder)",
                             code="adapter_not_found")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidAdapter(f"{folder} has no adapter_config.json: not a PEFT adapter folder")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise InvalidAdapter(f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{config_file} is not valid JSON: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"adapter {name!r} is {config.get('peft_type')}; only LoRA adapters are served")
    rank = int(config.get("r", 0))
    if rank < 1:
        raise InvalidAdapter(f"adapter_config.json in {folder} has no valid rank 'r'")
    if rank > max_rank:
        raise InvalidAdapter(f"adapter {name!r} has rank {rank}, above this server's limit of {max_rank}; "
                             f"raise JARVIS_MAX_LORA_RANK", code="rank_too_large")
    targets = config.get("target_modules") or []
    return AdapterInfo(name=name, path=str(folder), base_model=config.get("base_model_name_or_path"),
                       rank=rank, alpha=float(config.get("lora_alpha", rank)),
                       target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
                       use_dora=bool(config.get("use_dora", False)))


class AdapterStore:
    """name → path of the adapters a server serves, written atomically on every change."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def load(self) -> dict[str, str]:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def save(self, adapters: dict[str, str]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(adapters, indent=2, sort_keys=True))
        os.replace(tmp, self.file)
