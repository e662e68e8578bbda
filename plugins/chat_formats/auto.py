"""The `auto` chat format: the model's own Jinja chat template, else a family guessed from its architecture.

The template is rendered as Hugging Face's `apply_chat_template` renders it
(immutable sandbox, trim_blocks, lstrip_blocks, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML) but with an empty
`bos_token`, since the engine's tokenizer adds BOS. Template errors, whether
found when compiling or when rendering, surface as `ChatFormatError` on render,
so a model with a broken template still serves completions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jarvis.chat_format import ChatFormat, ChatFormatError, Messages
from jarvis.engine import ModelInfo
from jarvis.plugins.chat_formats.families import CHATML, FAMILIES, GEMMA, LLAMA3, MISTRAL
from jarvis.tool_calls import template_parser

#: Prefix of `ModelInfo.architecture` (GGUF `general.architecture`, HF `model_type`) -> its family.
ARCHITECTURE_FAMILIES = {"gemma": GEMMA, "llama": LLAMA3, "mistral": MISTRAL, "qwen": CHATML}

NO_TEMPLATE = ("the model has no chat template; set JARVIS_CHAT_FORMAT to one of "
               "chatml, gemma, llama3, mistral")


def auto_format(model_info: ModelInfo) -> ChatFormat:
    if model_info.chat_template:
        return template_format(model_info.chat_template, model_info.eos_token)
    architecture = (model_info.architecture or "").lower()
    for prefix, family in ARCHITECTURE_FAMILIES.items():
        if architecture.startswith(prefix):
            return replace(family, name=f"auto({family.name})")
    return ChatFormat("auto", _refusing(NO_TEMPLATE))


def template_format(template: str, eos_token: str) -> ChatFormat:
    """Renders `template`; stops at `eos_token` and at any family's end-of-turn marker the template uses."""
    markers = [stop for family in FAMILIES.values() for stop in family.stop if stop in template]
    stop = tuple(dict.fromkeys(s for s in (eos_token, *markers) if s))
    try:
        compiled = _ENVIRONMENT.from_string(template)
    except TemplateError as exc:
        return ChatFormat("auto", _refusing(f"the model's chat template does not compile: {exc}"), stop)

    def render(messages: Messages, add_generation_prompt: bool, **extra: Any) -> str:
        try:
            return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token="", eos_token=eos_token, **extra)
        except TemplateError as exc:
            raise ChatFormatError(f"the model's chat template failed: {exc}") from exc

    if "tools" not in template:  # the template teaches no tool syntax: Jarvis's convention serves tools
        return ChatFormat("auto", render, stop)

    def tool_prompt(messages: Messages, tools: Any, add_generation_prompt: bool) -> str:
        return render(messages, add_generation_prompt, tools=list(tools) or None)

    return ChatFormat("auto", render, stop, tool_prompt=tool_prompt, tool_parser=template_parser(template))


def _refusing(message: str) -> Callable[[Messages, bool], str]:
    def render(messages: Messages, add_generation_prompt: bool) -> str:
        raise ChatFormatError(message)
    return render


def _raise_exception(message: str) -> None:
    raise ChatFormatError(message)


def _strftime_now(pattern: str) -> str:
    return datetime.now().strftime(pattern)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Hugging Face's `tojson`: plain JSON, where Jinja's own escapes `<`, `>`, `&` and `'` for HTML."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


_ENVIRONMENT = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_ENVIRONMENT.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
_ENVIRONMENT.filters["tojson"] = _tojson
