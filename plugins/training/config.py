"""Training configuration: one pydantic model, filled from a YAML/TOML file and CLI flags.

Flags override the file; a bad value fails before any model loads, with the
field, the value and the fix (the same `ConfigError` the server uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jarvis.errors import ConfigError

FIXES = {
    "rank": "use a LoRA rank between 1 and 256 (8-64 is typical)",
    "alpha": "use a positive alpha (often 2 x rank)",
    "dropout": "use a dropout in [0, 1)",
    "learning_rate": "use a learning rate in (0, 1], e.g. 2e-4",
    "batch_size": "use a batch size of at least 1",
    "grad_accum": "use --grad-accum of at least 1",
    "eval_fraction": "use an eval fraction in [0, 0.5]",
    "max_length": "use a max length between 16 and the model's context",
    "tracker": "use --tracker mlflow or --tracker none",
    "schedule": "use --schedule linear, cosine or constant",
}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path
    name: str = Field("adapter", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base_model: Path | None = None  # a transformers folder; None = the embedded model
    output_dir: Path | None = None  # None = <adapter root>/<name>
    chat_format: str = "auto"
    # LoRA
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    dora: bool = False
    qlora: bool = False
    # optimisation
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_length: int = Field(512, ge=16)
    eval_fraction: float = Field(0.1, ge=0, le=0.5)
    seed: int = 0
    # bookkeeping
    save_every: int = Field(50, ge=1)
    log_every: int = Field(5, ge=1)
    tracker: Literal["mlflow", "none"] = "mlflow"
    tracking_uri: str | None = None  # None = file store ./mlruns
    strict: bool = False

    @model_validator(mode="after")
    def _qlora_is_lora(self) -> TrainConfig:
        if self.qlora and self.dora:
            raise ValueError("qlora and dora together are not supported; pick one")
        return self


def read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    import yaml

    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "the file is not a mapping of settings",
                          "write one `key: value` per setting")
    return data


def build_config(file: Path | None, **flags: Any) -> TrainConfig:
    values = read_config_file(file) if file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "config"
        raise ConfigError(f"--{field.replace('_', '-')}", err.get("input"), err["msg"],
                          FIXES.get(field, "see `jarvis train --help`")) from None
