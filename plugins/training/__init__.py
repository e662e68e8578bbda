"""Training plugin: datasets, LoRA/QLoRA/DoRA fine-tuning with PEFT, tracking, publishing adapters."""

from __future__ import annotations

from typing import Any

from jarvis import hookimpl


@hookimpl
def jarvis_register_commands(cli: Any) -> None:
    from jarvis.plugins.training import cli as train_cli
    from jarvis.plugins.training import data_cli

    data_cli.register(cli)
    train_cli.register(cli)
