"""Loads plugins: every entry point in the `jarvis` group, built-ins included.

Built-in engines and plugins are declared in pyproject.toml exactly as a
third-party package declares its own, so the loading path is one path.
`JARVIS_PLUGINS` is an allow-list for third-party entry points (built-ins
always load), like vLLM's `VLLM_PLUGINS`. Events go to plugins through the
manager's `relay` (`jarvis.hook_relay`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from jarvis import hookspecs
from jarvis.errors import ConfigError
from jarvis.hook_relay import HookRelay

log = logging.getLogger("jarvis.plugins")

DISTRIBUTION = "jarvis-llm"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str
    builtin: bool


class JarvisPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from."""

    #: How many managers this process built (`jarvis serve` builds one).
    built = 0

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self.relay = HookRelay(self)
        JarvisPluginManager.built += 1

    def load_entry_points(self, allow: list[str] | None = None, failures: list[ConfigError] | None = None) -> None:
        """Register every allowed entry point. A plugin that fails to import raises `ConfigError`, or, given
        `failures`, is added there and the others still load."""
        for ep in sorted(entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            builtin = _normalise(dist) == _normalise(DISTRIBUTION)
            if not builtin and allow is not None and ep.name not in allow:
                log.info("plugin %s (%s) not in JARVIS_PLUGINS; skipped", ep.name, dist)
                continue
            if self.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must say so, not vanish
                problem = ConfigError(
                    "JARVIS_PLUGINS", allow, f"plugin {ep.name!r} from {dist} {version} failed to "
                    f"import ({type(exc).__name__}: {exc})",
                    f"reinstall or fix {dist}, or leave {ep.name!r} out of JARVIS_PLUGINS")
                if failures is None:
                    raise problem from exc
                failures.append(problem)
                continue
            self.register(module, name=ep.name)
            self.infos.append(PluginInfo(ep.name, ep.value, dist, version, builtin))


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def create_plugin_manager(allow: list[str] | None = None,
                          failures: list[ConfigError] | None = None) -> JarvisPluginManager:
    pm = JarvisPluginManager()
    pm.load_entry_points(allow, failures)
    return pm
