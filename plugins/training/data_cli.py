"""`jarvis data check FILE`: validate a training dataset and report every invalid example before training."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jarvis.plugins.chat_formats.families import FAMILIES
from jarvis.plugins.training.datasets import DatasetError, prepare_dataset


@click.group("data")
def data() -> None:
    """Inspect training datasets (JSONL, JSON or CSV)."""


@data.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--chat-format", type=click.Choice(sorted(FAMILIES)), default="gemma", show_default=True,
              help="Chat format that renders the examples.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any example is invalid.")
def check(file: str, chat_format: str, strict: bool) -> None:
    """Report FILE's records per kind and every invalid one, with what is wrong."""
    console = Console(soft_wrap=True)  # built here so that click's runner captures it; ids never wrap
    try:
        report = prepare_dataset(file, FAMILIES[chat_format])
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None

    table = Table(title=f"{escape(file)} ({chat_format})")
    table.add_column("kind")
    table.add_column("records", justify="right")
    for kind, count in sorted(report.kinds.items()):
        table.add_row(kind, str(count))
    console.print(table)
    if report.invalid:
        console.print("[bold red]Invalid examples[/]")
        for example_id, problem in report.invalid:
            console.print(f"  [red]✗[/] [bold]{escape(example_id)}[/]: {escape(problem)}")
    colour = "red" if report.invalid else "green"
    console.print(f"[{colour}]{len(report.examples)} valid, {len(report.invalid)} invalid[/]")
    if strict and report.invalid:
        sys.exit(1)


def register(cli: click.Group) -> None:
    """Add the `data` group to the `jarvis` CLI."""
    cli.add_command(data)
