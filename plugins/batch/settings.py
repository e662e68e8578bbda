"""The batch plugin's settings: `JARVIS_BATCH_*` environment variables and `.env`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "JARVIS_BATCH_"


class BatchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    concurrency: int = Field(
        8, ge=1, le=1024,
        description="Batch lines in flight at once (all jobs together), so the engine's own batching fills.",
        json_schema_extra={"fix": "set JARVIS_BATCH_CONCURRENCY between 1 and 1024 "
                                  "(about the engine's parallel slots, e.g. JARVIS_LLAMA_N_PARALLEL)"})
    max_upload_bytes: int = Field(
        200 * 1024 * 1024, ge=1,
        description="Largest file POST /v1/files accepts; larger uploads get 413.",
        json_schema_extra={"fix": "set JARVIS_BATCH_MAX_UPLOAD_BYTES to a positive number of bytes"})
    max_lines: int = Field(
        50_000, ge=1,
        description="Most requests one batch may hold (OpenAI's limit is 50000).",
        json_schema_extra={"fix": "set JARVIS_BATCH_MAX_LINES to a positive integer"})
    dir: Path | None = Field(
        None, description="Where uploaded files, batch results and the job database live; "
                          "unset = <state_dir>/batch.",
        json_schema_extra={"fix": "set JARVIS_BATCH_DIR to a writable folder, or unset it"})

    def root(self, state_path: Path) -> Path:
        return (self.dir or state_path / "batch").expanduser()
