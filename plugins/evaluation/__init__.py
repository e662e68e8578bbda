"""Evaluation plugin: perplexity, base vs adapter, task metrics, serving benchmark and cost reports.

Adds `jarvis eval perplexity|tasks|compare|cost` and `jarvis bench`; the
modules import torch and matplotlib only when a command runs.
"""

from __future__ import annotations

from typing import Any

from jarvis import hookimpl


@hookimpl
def jarvis_register_commands(cli: Any) -> None:
    from jarvis.plugins.evaluation import cli as eval_cli

    eval_cli.register(cli)
