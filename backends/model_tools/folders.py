"""Transformers model folders: which folder is one, the one JARVIS_MODEL_NAME names, and the id it is served as.

The transformers and vLLM engines serve the same folders (written by `save_pretrained`, or the embedded GGUF
converted once by `convert`), so they recognise them and name them the same way.
"""

from __future__ import annotations

from pathlib import Path

from jarvis.errors import ConfigError


def is_transformers_folder(folder: Path) -> bool:
    """Whether `folder` holds a transformers model: its config.json is there."""
    return (folder / "config.json").is_file()


def named_model_folder(model_name: str, engine_note: str = "") -> Path:
    """The transformers folder JARVIS_MODEL_NAME names; a ConfigError when it is not one (`engine_note` says
    what the engine serves instead, if anything)."""
    folder = Path(model_name).expanduser()
    if not is_transformers_folder(folder):
        raise ConfigError("JARVIS_MODEL_NAME", model_name, f"not a transformers model folder (no config.json)"
                          f"{'; ' + engine_note if engine_note else ''}",
                          "point JARVIS_MODEL_NAME at a folder written by save_pretrained, or unset it to serve "
                          "the embedded model (converted once)")
    return folder


def served_model_id(folder: Path, *, embedded: bool) -> str:
    """The model id a folder is served as: its name; the embedded model's converted folder without its "-hf"."""
    return folder.name.removesuffix("-hf") if embedded else folder.name
