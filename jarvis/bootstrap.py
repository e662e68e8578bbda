"""One start for every entry point: settings → plugins → registries → every problem found, built once.

`jarvis serve`, `doctor`, `plugins` and the plugins' commands (batch, train, eval) all begin with a
`Bootstrap`: the CLI builds one per process and hands it to its commands (`click` context object), and a
command that needs other settings (`serve --engine hf`) asks it for `with_overrides(...)`, which keeps the
plugin manager and the registries and checks the new settings again. A bad setting does not stop the checks:
it falls back to its default so that every other problem is still found, and each problem says the setting,
the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import click

from jarvis.errors import ConfigError
from jarvis.plugin_manager import JarvisPluginManager, create_plugin_manager
from jarvis.registry import Registries, check_settings
from jarvis.settings import JarvisSettings, SettingsError, load_settings


@dataclass
class Bootstrap:
    settings: JarvisSettings
    plugins: JarvisPluginManager
    registries: Registries
    #: Everything found wrong: settings, plugin names, plugins that failed to import, engine settings and
    #: the plugins' own settings (`jarvis_check_settings`).
    problems: list[ConfigError] = field(default_factory=list)
    #: Plugins that failed to import (also among `problems`); the others are loaded.
    plugin_failures: list[ConfigError] = field(default_factory=list)

    def with_overrides(self, **overrides: Any) -> Bootstrap:
        """The same plugins with settings resolved again under `overrides` (None values are left out)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not overrides:
            return self
        settings, problems = resolve_settings(**overrides)
        return replace(self, settings=settings,
                       problems=[*self.plugin_failures, *problems, *self._checks(settings)])

    def require_valid(self) -> None:
        """Raise `SettingsError` with every problem, if there is one."""
        if self.problems:
            raise SettingsError(self.problems)

    def engine_options(self) -> Any:
        """The selected engine's own settings (its `options` class, e.g. JARVIS_LLAMA_*), validated; None when
        the engine declares none or is unknown."""
        return _engine_options(self.registries, self.settings)

    def _checks(self, settings: JarvisSettings) -> list[ConfigError]:
        problems = check_settings(settings, self.registries)
        try:
            _engine_options(self.registries, settings)
        except SettingsError as exc:
            problems += exc.problems
        for found in self.plugins.hook.jarvis_check_settings(settings=settings):
            problems += found
        return problems


def _engine_options(registries: Registries, settings: JarvisSettings) -> Any:
    options = registries.engines.options.get(settings.inference_engine)
    return load_settings(options, prefix=options.model_config.get("env_prefix", "")) if options else None


def resolve_settings(**overrides: Any) -> tuple[JarvisSettings, list[ConfigError]]:
    """Settings as resolved; a bad field falls back to its default so that later checks still run."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return load_settings(**overrides), []
    except SettingsError as exc:
        bad = {p.setting.removeprefix("JARVIS_").lower() for p in exc.problems}
        defaults = {name: JarvisSettings.model_fields[name].get_default(call_default_factory=True)
                    for name in bad if name in JarvisSettings.model_fields}
        return load_settings(**{**overrides, **defaults}), exc.problems


def bootstrap(plugins: JarvisPluginManager | None = None, **overrides: Any) -> Bootstrap:
    """Settings, the plugin manager, the registries and every problem, once. `plugins`: a manager built
    already (a test or a bench that registers a plugin object of its own), instead of a new one."""
    settings, problems = resolve_settings(**overrides)
    failures: list[ConfigError] = []
    if plugins is None:
        plugins = create_plugin_manager(settings.plugins, failures=failures)
    boot = Bootstrap(settings, plugins, Registries.from_plugins(plugins), plugin_failures=failures)
    boot.problems = [*failures, *problems, *boot._checks(settings)]
    return boot


def current_bootstrap() -> Bootstrap:
    """The bootstrap of the running `jarvis` command (its click context object), or a new one when the
    command runs outside the CLI's main (a test invoking a command directly)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(Bootstrap) if ctx is not None else None
    return found if found is not None else bootstrap()
