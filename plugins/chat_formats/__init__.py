"""Built-in chat formats: chatml, llama3, mistral, gemma, and auto (the model's own template)."""

from __future__ import annotations

from collections.abc import Callable

from jarvis import hookimpl
from jarvis.chat_format import ChatFormat
from jarvis.engine import ModelInfo
from jarvis.plugins.chat_formats.auto import auto_format
from jarvis.plugins.chat_formats.families import FAMILIES


@hookimpl
def jarvis_register_chat_formats(register: Callable[[str, Callable[[ModelInfo], ChatFormat]], None]) -> None:
    for name, chat_format in FAMILIES.items():
        register(name, _fixed(chat_format))
    register("auto", auto_format)


def _fixed(chat_format: ChatFormat) -> Callable[[ModelInfo], ChatFormat]:
    """A factory for a format that is the same whatever the model."""
    return lambda model_info: chat_format
