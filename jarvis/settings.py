"""Jarvis configuration: `JARVIS_*` environment variables and `.env`.

Every field documents its valid values; a bad value fails at start with a
`SettingsError` whose lines name the setting, the value, and the fix.
Engine-specific knobs live beside their engine (e.g. `JARVIS_LLAMA_*` in
`jarvis.backends.llama_cpp.engine`), so this core module knows no engine by name.
Names that need the plugin registries (engine, chat format) are checked in
`jarvis.registry.check_settings` once plugins are loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceParseError

from jarvis.errors import ConfigError

ENV_PREFIX = "JARVIS_"


def env_name(field: str, prefix: str = ENV_PREFIX) -> str:
    return f"{prefix}{field.upper()}"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class JarvisSettings(BaseSettings):
    """The core server's settings."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      validate_default=True)

    inference_engine: str = Field(
        "llama_cpp", description="Engine that serves requests (see `jarvis plugins`).",
        json_schema_extra={"fix": "set JARVIS_INFERENCE_ENGINE to a registered engine name"})
    model_root: Path | None = Field(
        None, description="When set, JARVIS_MODEL_NAME must lie inside this folder (symlinks resolved).",
        json_schema_extra={"fix": "set JARVIS_MODEL_ROOT to the folder that holds your models, or unset it"})
    model_name: str | None = Field(
        None, description="Model path (a .gguf file for llama_cpp); unset = the embedded default model.",
        json_schema_extra={"fix": "point JARVIS_MODEL_NAME at a model file or folder, or unset it"})
    served_model_name: str | None = Field(
        None, description="Model id clients send and /v1/models lists; default: the model file's stem.",
        json_schema_extra={"fix": "set JARVIS_SERVED_MODEL_NAME to a non-empty id"})
    host: str = Field("127.0.0.1", min_length=1, description="Interface to bind.",
                      json_schema_extra={"fix": "set JARVIS_HOST to an address such as 127.0.0.1 or 0.0.0.0"})
    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind.",
                      json_schema_extra={"fix": "set JARVIS_PORT to an integer between 1 and 65535"})
    chat_format: str = Field(
        "auto", description="How chat messages become a prompt; auto = the model's own template.",
        json_schema_extra={"fix": "set JARVIS_CHAT_FORMAT to a registered format "
                                  "(auto, chatml, gemma, llama3, mistral)"})
    chat_formats: dict[str, str] = Field(
        default_factory=dict,
        description='Per-model override of chat_format, JSON: {"model-id": "chatml"}.',
        json_schema_extra={"fix": 'set JARVIS_CHAT_FORMATS to a JSON object such as {"my-model": "chatml"}'})
    max_model_len: int = Field(
        4096, ge=16, le=1_048_576, description="Context window in tokens (prompt + completion).",
        json_schema_extra={"fix": "set JARVIS_MAX_MODEL_LEN to an integer between 16 and 1048576"})
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys; empty = no auth.",
        json_schema_extra={"fix": "set JARVIS_API_KEYS to comma-separated keys, e.g. key1,key2"})
    plugins: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Allow-list of third-party plugin entry-point names; unset = load all.",
        json_schema_extra={"fix": "set JARVIS_PLUGINS to comma-separated names from `jarvis plugins`"})
    data_dir: Path = Field(
        Path.home() / ".cache" / "jarvis", description="Where Jarvis keeps caches and state.",
        json_schema_extra={"fix": "set JARVIS_DATA_DIR to a writable folder"})
    state_dir: Path | None = Field(
        None, description="Where a server keeps its state (served adapters, jobs); unset = <data_dir>/state.",
        json_schema_extra={"fix": "set JARVIS_STATE_DIR to a writable folder"})
    dtype: str = Field(
        "auto", pattern="^(auto|fp32|fp16|bf16)$", description="Weights/compute dtype for torch engines.",
        json_schema_extra={"fix": "set JARVIS_DTYPE to one of auto, fp32, fp16, bf16"})
    device: str = Field(
        "auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$", description="Device for torch engines; auto = cuda if present.",
        json_schema_extra={"fix": "set JARVIS_DEVICE to auto, cpu, cuda or cuda:N"})
    adapter_root: Path | None = Field(
        None, description="Folder that every LoRA adapter path must be inside; unset = <data_dir>/adapters.",
        json_schema_extra={"fix": "set JARVIS_ADAPTER_ROOT to an existing folder that holds your adapters"})
    lora_modules: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="Adapters to load at start: name=path,name2=path2.",
        json_schema_extra={"fix": "set JARVIS_LORA_MODULES to comma-separated name=path pairs"})
    max_lora_rank: int = Field(
        64, ge=1, le=1024, description="Largest LoRA rank an adapter may have.",
        json_schema_extra={"fix": "set JARVIS_MAX_LORA_RANK between 1 and 1024"})
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer keys with the admin scope: adapter load/unload, engine control, "
                    "every key's stored objects. They are valid API keys too.",
        json_schema_extra={"fix": "set JARVIS_ADMIN_KEYS to comma-separated keys, e.g. ops-key1"})
    api_keys_file: Path | None = Field(
        None, description="A file of bearer keys, one per line (# comments), added to JARVIS_API_KEYS; a key may be "
                          "followed by its scopes: `sk-ops admin`.",
        json_schema_extra={"fix": "point JARVIS_API_KEYS_FILE at a readable file with one key per line, each "
                                  "optionally followed by the scope admin"})
    engine_info_access: str = Field(
        "key", pattern="^(open|key|admin)$",
        description="Who may read GET /v1/engine (engine, model path, device, batching): open, key (any API key) "
                    "or admin.",
        json_schema_extra={"fix": "set JARVIS_ENGINE_INFO_ACCESS to open, key or admin"})
    protect_health: bool = Field(
        False, description="Require an API key on /health too (default: open, for load balancers).",
        json_schema_extra={"fix": "set JARVIS_PROTECT_HEALTH to true or false"})
    max_request_bytes: int = Field(
        10 * 2**20, ge=1024, le=2**31, description="Largest request body in bytes; larger gets 413.",
        json_schema_extra={"fix": "set JARVIS_MAX_REQUEST_BYTES to a number of bytes, e.g. 10485760"})
    max_tokens_cap: int | None = Field(
        None, ge=1, le=1_048_576, description="Largest max_tokens a request may ask for; unset = the context.",
        json_schema_extra={"fix": "set JARVIS_MAX_TOKENS_CAP to a positive integer, or unset it"})
    max_concurrent: int | None = Field(
        None, ge=1, le=100_000, description="Generations running at once; unset = no limit (the engine queues).",
        json_schema_extra={"fix": "set JARVIS_MAX_CONCURRENT to a positive integer, or unset it"})
    max_queue: int = Field(
        256, ge=0, le=1_000_000, description="Requests that may wait for a slot; beyond that, 429 + Retry-After.",
        json_schema_extra={"fix": "set JARVIS_MAX_QUEUE to 0 or more"})
    rate_limit_rpm: int | None = Field(
        None, ge=1, description="Requests per minute per API key (or per address without keys); unset = none.",
        json_schema_extra={"fix": "set JARVIS_RATE_LIMIT_RPM to a positive integer, or unset it"})
    rate_limit_tpm: int | None = Field(
        None, ge=1, description="Tokens (prompt + completion) per minute per API key; unset = none.",
        json_schema_extra={"fix": "set JARVIS_RATE_LIMIT_TPM to a positive integer, or unset it"})
    drain_timeout: float = Field(
        30, ge=0, le=86_400, description="On SIGTERM, seconds in-flight requests and streams may take to finish.",
        json_schema_extra={"fix": "set JARVIS_DRAIN_TIMEOUT to a number of seconds"})
    keep_alive_timeout: int = Field(
        75, gt=0, le=86_400,
        description="Seconds an idle client connection stays open. Longer than clients' pool expiry (httpx and "
                    "the openai SDK: 5 s, aiohttp: 15 s), as reverse proxies do (nginx: 75 s), so the server never "
                    "closes a connection while a client sends its next request on it.",
        json_schema_extra={"fix": "set JARVIS_KEEP_ALIVE_TIMEOUT to a number of seconds"})
    engine_start_retry: bool = Field(
        False, description="When the engine fails its first start: false = the server exits non-zero with the "
                           "reason; true = it stays up (503, /health says why) and retries with back-off.",
        json_schema_extra={"fix": "set JARVIS_ENGINE_START_RETRY to true or false"})
    access_log: bool = Field(True, description="A log line per HTTP request (uvicorn's access log); off saves "
                                               "about 0.25 ms of CPU per request on a busy proxy.",
                             json_schema_extra={"fix": "set JARVIS_ACCESS_LOG to true or false"})
    log_level: str = Field(
        "info", pattern="^(critical|error|warning|info|debug)$", description="Server log level.",
        json_schema_extra={"fix": "set JARVIS_LOG_LEVEL to one of critical, error, warning, info, debug"})

    @field_validator("api_keys", "admin_keys", "plugins", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs = {}
        for item in _split_csv(value):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"{item!r} is not name=path")
            pairs[name.strip()] = path.strip()
        return pairs

    @field_validator("model_name")
    @classmethod
    def _inside_model_root(cls, value: str | None, info: Any) -> str | None:
        root = info.data.get("model_root")
        if value and root is not None:
            real_root = root.expanduser().resolve()
            path = Path(value).expanduser()
            real = (path if path.is_absolute() else real_root / path).resolve()
            if real != real_root and real_root not in real.parents:
                raise ValueError(f"{value} is outside JARVIS_MODEL_ROOT ({root}); models must lie inside it")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            if not value.expanduser().is_file():
                raise ValueError(f"{value} is not a readable file")
            for number, (_, scopes) in enumerate(_key_lines(value), 1):
                unknown = [s for s in scopes if s != "admin"]
                if unknown:
                    raise ValueError(f"{value}: key {number} has the unknown scope {unknown[0]!r}; the one "
                                     "scope is admin")
        return value

    def keys_file_entries(self) -> list[tuple[str, list[str]]]:
        """(key, scopes) of every line of JARVIS_API_KEYS_FILE."""
        return _key_lines(self.api_keys_file) if self.api_keys_file is not None else []

    @property
    def all_api_keys(self) -> list[str]:
        """JARVIS_API_KEYS, JARVIS_ADMIN_KEYS and the keys in JARVIS_API_KEYS_FILE."""
        keys = [*self.api_keys, *self.admin_keys, *(key for key, _ in self.keys_file_entries())]
        return list(dict.fromkeys(keys))

    @property
    def state_path(self) -> Path:
        return (self.state_dir or self.data_dir / "state").expanduser()

    @property
    def adapter_dir(self) -> Path:
        return (self.adapter_root or self.data_dir / "adapters").expanduser()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def _key_lines(path: Path) -> list[tuple[str, list[str]]]:
    entries = []
    for line in path.expanduser().read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            entries.append((words[0], words[1:]))
    return entries


class SettingsError(Exception):
    """One or more settings are invalid; `problems` holds one ConfigError each."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def load_settings(model: type[BaseSettings] = JarvisSettings, prefix: str = ENV_PREFIX,
                  **overrides: Any) -> Any:
    """Build a settings object, turning pydantic's errors into named fixes."""
    try:
        return model(**overrides)
    except ValidationError as exc:
        raise SettingsError(problems_from_validation(model, exc, prefix)) from None
    except SourceParseError as exc:  # a JSON-valued variable that is not JSON
        match = re.search(r'field "(\w+)"', str(exc))
        field = match.group(1) if match else "?"
        raise SettingsError([_problem(model, field, os.environ.get(env_name(field, prefix)),
                                      f"not valid JSON ({exc.__cause__})", prefix)]) from None


def problems_from_validation(model: type[BaseSettings], exc: ValidationError,
                             prefix: str) -> list[ConfigError]:
    return [_problem(model, str(err["loc"][0]) if err["loc"] else "?", err.get("input"), err["msg"], prefix)
            for err in exc.errors()]


def _problem(model: type[BaseSettings], field: str, value: Any, message: str, prefix: str) -> ConfigError:
    info = model.model_fields.get(field)
    extra = (info.json_schema_extra or {}) if info else {}
    fix = extra.get("fix") if isinstance(extra, dict) else None
    return ConfigError(env_name(field, prefix), value, message, str(fix or "see .env.example"))
