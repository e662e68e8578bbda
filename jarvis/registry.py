"""Engine and chat-format registries, filled by plugin hooks.

Selection by name fails with the closest registered names, and
`check_settings` turns such a failure into a `ConfigError` naming the setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic_settings import BaseSettings

from jarvis.errors import ConfigError, UnknownName

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Registry(Generic[F]):
    kind: str
    entries: dict[str, F] = field(default_factory=dict)
    #: name → the entry's own settings class (pydantic-settings), where it declares one: what `doctor` shows
    #: and checks without constructing the entry.
    options: dict[str, type[BaseSettings]] = field(default_factory=dict)

    def register(self, name: str, factory: F, options: type[BaseSettings] | None = None) -> None:
        if not name or not callable(factory):
            raise ValueError(f"a {self.kind} needs a name and a callable factory, got {name!r}, {factory!r}")
        self.entries[name] = factory
        if options is not None:
            self.options[name] = options

    def get(self, name: str) -> F:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownName(self.kind, name, self.entries) from None

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entries))


@dataclass
class Registries:
    engines: Registry = field(default_factory=lambda: Registry("engine"))
    chat_formats: Registry = field(default_factory=lambda: Registry("chat format"))

    @classmethod
    def from_plugins(cls, pm: Any) -> Registries:
        registries = cls()
        pm.hook.jarvis_register_engines(register=registries.engines.register)
        pm.hook.jarvis_register_chat_formats(register=registries.chat_formats.register)
        return registries


def check_settings(settings: Any, registries: Registries) -> list[ConfigError]:
    """Problems with names in `settings` that only the registries can judge."""
    problems: list[ConfigError] = []

    def check(setting: str, value: str, registry: Registry) -> None:
        if value in registry:
            return
        err = UnknownName(registry.kind, value, registry.entries)
        fix = (f"set {setting}={err.suggestions[0]}" if err.suggestions
               else f"set {setting} to one of: {', '.join(err.known)}")
        problems.append(ConfigError(setting, value, f"no {registry.kind} of that name is registered"
                                    + (f" (did you mean {' or '.join(map(repr, err.suggestions))}?)"
                                       if err.suggestions else ""), fix))

    check("JARVIS_INFERENCE_ENGINE", settings.inference_engine, registries.engines)
    check("JARVIS_CHAT_FORMAT", settings.chat_format, registries.chat_formats)
    for model, fmt in settings.chat_formats.items():
        check(f"JARVIS_CHAT_FORMATS[{model!r}]", fmt, registries.chat_formats)
    return problems
