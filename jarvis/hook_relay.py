"""Events to plugins, one plugin at a time: one that raises does not hide the event from the others."""

from __future__ import annotations

import logging
from typing import Any

import pluggy

log = logging.getLogger("jarvis.plugins")


class HookRelay:
    """Fires an event hook implementation by implementation (in pluggy's order), so that one which raises
    is logged with its plugin's name and the others still get the event; pluggy alone stops at the first
    exception. The results that are not None come back as a list, as pluggy's do."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def call(self, hook: str, **kwargs: Any) -> list[Any]:
        caller = getattr(self._pm.hook, hook)
        results: list[Any] = []
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last registered first
            try:
                result = impl.function(*(kwargs[name] for name in impl.argnames))
            except Exception:
                log.exception("plugin %s: %s raised; the other plugins still get the event", impl.plugin_name, hook)
                continue
            if result is not None:
                results.append(result)
        return results
