"""LoRA adapters, engine-neutral: validation of PEFT folders, the persisted set of served adapters, and
`AdapterService`, which loads and unloads them on the engine.

`inspect_adapter` accepts a folder only if it is inside the adapter root (after
resolving symlinks), holds `adapter_config.json` and weights, is a LoRA, and
its rank fits the engine's limit; otherwise `InvalidAdapter` (a 400) says
why. `AdapterStore` keeps name → path in a JSON file in the data dir, so a
restarted server serves the same adapters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from jarvis.engine import AdapterInfo, Engine
from jarvis.errors import APIError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from jarvis.settings import JarvisSettings

__all__ = ["AdapterInfo", "AdapterService", "InvalidAdapter", "inspect_adapter"]

log = logging.getLogger("jarvis.adapters")

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class InvalidAdapter(InvalidRequest):
    def __init__(self, message: str, code: str = "invalid_adapter") -> None:
        super().__init__(message, param="lora_path", code=code)


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


class AdapterService:
    """The adapters a server serves: load and unload them on the engine, keep the list on disk, serve the
    same ones after a restart (of the server or of the engine).

    `engine()` gives the current engine (a restart replaces it); `model_id()` the served base model's name,
    which no adapter may take. An adapter that cannot be restored stays registered (`unrestored`): a
    missing disk or file may come back, and unloading it unregisters it."""

    def __init__(self, settings: JarvisSettings, engine: Callable[[], Engine], model_id: Callable[[], str]) -> None:
        self.settings = settings
        self._engine = engine
        self._model_id = model_id
        self.served: dict[str, AdapterInfo] = {}
        self.unrestored: dict[str, str] = {}
        self._store = AdapterStore(settings.state_path / "adapters.json")
        self._lock = asyncio.Lock()

    async def load(self, name: str, path: str, *, persist: bool = True, private: bool = False,
                   owner: str | None = None) -> AdapterInfo:
        if not name or name == self._model_id():
            raise InvalidRequest(f"lora_name {name!r} is empty or names the base model", param="lora_name")
        async with self._lock:
            if name in self.served:
                raise InvalidRequest(f"The lora adapter '{name}' has already been loaded; unload it first.",
                                     param="lora_name", code="adapter_exists")
            adapter = replace(inspect_adapter(name, path, self.settings.adapter_dir, self.settings.max_lora_rank),
                              private=private, owner=owner if private else None)
            engine = self._engine()
            try:
                await engine.load_adapter(adapter)
            except NotImplementedError as exc:
                raise InvalidRequest(str(exc), code="adapters_not_supported") from None
            except APIError:
                raise
            except Exception as exc:
                raise InvalidAdapter(f"the {engine.name} engine could not load adapter {name!r}: "
                                     f"{type(exc).__name__}: {exc}", code="adapter_load_failed") from exc
            self.served[name] = adapter
            self.unrestored.pop(name, None)
            if persist:
                self._persist()
        log.info("adapter %s loaded from %s (rank %d)", name, adapter.path, adapter.rank)
        return adapter

    async def unload(self, name: str) -> None:
        async with self._lock:
            if self.unrestored.pop(name, None) is not None and name not in self.served:
                self._persist()  # unregistering one that could not be restored
                return
            if name not in self.served:
                raise NotFound(f"The lora adapter '{name}' is not loaded.", param="lora_name",
                               code="adapter_not_found")
            await self._engine().unload_adapter(name)
            del self.served[name]
            self._persist()

    async def restore(self) -> None:
        """At a server start: serve again what was served before, plus JARVIS_LORA_MODULES."""
        stored = self._store.load()
        for name, path in {**stored, **self.settings.lora_modules}.items():
            try:
                await self.load(name, path, persist=False)
            except Exception as exc:  # one bad adapter must not take the server down
                log.error("adapter %s (%s) not loaded: %s", name, path, exc)
                if name in stored:
                    self.unrestored[name] = stored[name]
        self._persist()

    async def reload_into(self, engine: Engine) -> None:
        """After an engine restart: the new engine serves the same adapters."""
        for adapter in list(self.served.values()):
            try:
                await engine.load_adapter(adapter)
            except Exception as exc:
                log.error("adapter %s not reloaded after the restart: %s", adapter.name, exc)
                del self.served[adapter.name]
                self.unrestored[adapter.name] = adapter.path

    def _persist(self) -> None:
        self._store.save({**self.unrestored, **{name: a.path for name, a in self.served.items()}})
