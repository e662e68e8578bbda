"""The Tinker service's settings: `JARVIS_TINKER_*` environment variables and `.env`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "JARVIS_TINKER_"


class TinkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    enabled: bool = Field(
        True, description="Serve the Tinker training API under /api/v1 (needs the [tinker] extra).",
        json_schema_extra={"fix": "set JARVIS_TINKER_ENABLED to true or false"})
    base_model: Path | None = Field(
        None, description="The transformers folder the trainer loads: the served model's weights. Unset = the "
                          "served folder (hf, vllm engines) or the embedded model's conversion (llama_cpp).",
        json_schema_extra={"fix": "point JARVIS_TINKER_BASE_MODEL at a transformers model folder of the "
                                  "served model"})
    max_pending: int = Field(
        64, ge=1, le=100_000,
        description="Accepted Tinker requests not yet done (all keys); beyond that, 429 with Retry-After.",
        json_schema_extra={"fix": "set JARVIS_TINKER_MAX_PENDING to a positive integer"})
    max_models: int = Field(
        8, ge=1, le=1024, description="Training models (LoRA adapters with their optimizers) alive at once.",
        json_schema_extra={"fix": "set JARVIS_TINKER_MAX_MODELS to a positive integer"})
    poll_wait_s: float = Field(
        25.0, gt=0, le=40,
        description="How long a retrieve_future waits for a result before answering try_again (the SDK's "
                    "timeout is 45 s).",
        json_schema_extra={"fix": "set JARVIS_TINKER_POLL_WAIT_S between 0 and 40"})
    dir: Path | None = Field(
        None, description="Where sessions, futures and checkpoints live; unset = <state_dir>/tinker.",
        json_schema_extra={"fix": "set JARVIS_TINKER_DIR to a writable folder, or unset it"})

    def root(self, state_path: Path) -> Path:
        return (self.dir or state_path / "tinker").expanduser()
