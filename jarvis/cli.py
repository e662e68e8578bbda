"""The `jarvis` command line: serve, doctor, plugins; plugins add their own commands.

`main` bootstraps once (`jarvis.bootstrap`: settings, plugins, registries, problems) and hands the result to
every command as the click context object. Heavy modules (engines, uvicorn) load inside the commands that
need them, so `jarvis --help` stays instant.
"""

from __future__ import annotations

import math
import signal
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from jarvis import __version__
from jarvis.bootstrap import Bootstrap, bootstrap, current_bootstrap
from jarvis.errors import ConfigError
from jarvis.settings import JarvisSettings, SettingsError, load_settings

console = Console(stderr=True)


def _print_problems(problems: list[ConfigError]) -> None:
    for p in problems:
        console.print(f"  [red]✗[/] [bold]{p.setting}[/]={p.value!r}: {p.problem}\n    [green]fix:[/] {p.fix}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jarvis")
def cli() -> None:
    """Jarvis: an OpenAI-compatible, plugin-extensible LLM server."""


@cli.command()
@click.option("--host", help="Interface to bind (JARVIS_HOST).")
@click.option("--port", type=int, help="Port to bind (JARVIS_PORT).")
@click.option("--engine", "inference_engine", help="Engine name (JARVIS_INFERENCE_ENGINE).")
@click.option("--model", "model_name", help="Model path (JARVIS_MODEL_NAME).")
def serve(**overrides: Any) -> None:
    """Serve the OpenAI-compatible API."""
    import uvicorn

    from jarvis.app import create_app

    boot = current_bootstrap().with_overrides(**overrides)
    settings = boot.settings
    if boot.problems:
        console.print("[bold red]Jarvis cannot start: invalid configuration[/]")
        _print_problems(boot.problems)
        sys.exit(2)
    failures: list[str] = []
    server: uvicorn.Server | None = None

    def engine_failed(reason: str) -> None:  # the first start failed: stop serving, exit non-zero
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(boot, on_engine_failure=engine_failed)  # the engine is built here, once
    except (SettingsError, ConfigError) as exc:  # what only the engine can judge (a model path, its files)
        console.print("[bold red]Jarvis cannot start: invalid configuration[/]")
        _print_problems(exc.problems if isinstance(exc, SettingsError) else [exc])
        sys.exit(2)
    console.print(f"[bold]Jarvis[/] {__version__}: engine [cyan]{settings.inference_engine}[/] on "
                  f"http://{settings.host}:{settings.port}/v1")
    # SIGTERM: stop accepting, let in-flight requests and streams finish (up to the drain timeout), then stop.
    # uvicorn re-raises the signal after its shutdown; this handler makes that a clean exit (status 0).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           access_log=settings.access_log,
                                           timeout_graceful_shutdown=math.ceil(settings.drain_timeout),
                                           timeout_keep_alive=settings.keep_alive_timeout))
    server.run()
    if failures:
        console.print(f"[bold red]Jarvis stopped: the {settings.inference_engine} engine failed to start[/]\n"
                      f"  {failures[0]}\n  [green]fix:[/] the reason above; `jarvis doctor` checks the "
                      "configuration; JARVIS_ENGINE_START_RETRY=true keeps the server up (503) and retries")
        sys.exit(1)


@cli.command()
@click.option("--engine", "inference_engine", help="Check this engine instead of JARVIS_INFERENCE_ENGINE.")
def doctor(inference_engine: str | None) -> None:
    """Print the resolved configuration and everything found wrong with it (for the engine too)."""
    boot = current_bootstrap().with_overrides(inference_engine=inference_engine)
    settings, problems = boot.settings, list(boot.problems)
    engine = None
    if not any(p.setting == "JARVIS_INFERENCE_ENGINE" for p in problems):
        try:  # what only the engine can judge: the model path, its files
            engine = boot.registries.engines.get(settings.inference_engine)(settings)
        except SettingsError as exc:  # the engine's own settings: found by the bootstrap already
            seen = {(p.setting, p.problem) for p in problems}
            problems += [p for p in exc.problems if (p.setting, p.problem) not in seen]
        except ConfigError as exc:
            problems.append(exc)
    table = Table(title="Jarvis configuration", show_lines=False)
    for column in ("setting", "value", "meaning"):
        table.add_column(column)
    for name, field in JarvisSettings.model_fields.items():
        value = getattr(settings, name)
        shown = "***" if name == "api_keys" and value else value
        table.add_row(f"JARVIS_{name.upper()}", str(shown) if shown is not None else "(unset)",
                      field.description or "")
    Console().print(table)
    options_table(boot)
    if engine is not None:
        try:
            described = engine.describe()
        except Exception as exc:  # describing must never hide the problems below
            described = {"error": f"{type(exc).__name__}: {exc}"}
        Console().print(f"engine [cyan]{engine.name}[/]: {described}")
    if problems:
        _print_problems(problems)
        sys.exit(1)
    console.print("[green]✓ no problems found[/]")


@cli.command("plugins")
def list_plugins() -> None:
    """List the loaded plugins, their engines and chat formats."""
    boot = current_bootstrap()  # listing needs no engine: `doctor` checks the rest
    if boot.plugin_failures:
        _print_problems(boot.plugin_failures)
    pm, registries = boot.plugins, boot.registries
    table = Table(title="Jarvis plugins (entry-point group 'jarvis')")
    for column in ("name", "module", "distribution", "version", "kind"):
        table.add_column(column)
    for info in pm.infos:
        table.add_row(info.name, info.module, info.distribution, info.version,
                      "built-in" if info.builtin else "third-party")
    out = Console()
    out.print(table)
    out.print(f"engines: {', '.join(registries.engines)}")
    out.print(f"chat formats: {', '.join(registries.chat_formats)}")


@cli.group()
def models() -> None:
    """Model files: where the embedded model lives, conversions (engines add commands here)."""


@models.command("path")
def model_path() -> None:
    """Print the path of the embedded default model (assembling it on first use)."""
    from jarvis.embedded_model import embedded_model_path

    click.echo(str(embedded_model_path(load_settings().data_dir)))


def options_table(boot: Bootstrap) -> None:
    """The selected engine's own settings (its declared options class), without constructing the engine."""
    options = boot.registries.engines.options.get(boot.settings.inference_engine)
    if options is None:
        return
    prefix = options.model_config.get("env_prefix", "")
    try:
        values = boot.engine_options()
    except SettingsError:
        values = None  # the problems are printed below
    table = Table(title=f"engine {boot.settings.inference_engine}: its own settings")
    for column in ("setting", "value", "meaning"):
        table.add_column(column)
    for name, field in options.model_fields.items():
        value = getattr(values, name) if values is not None else "(invalid)"
        table.add_row(f"{prefix}{name.upper()}", "(unset)" if value is None else str(value), field.description or "")
    Console().print(table)


def build_cli(boot: Bootstrap) -> click.Group:
    """The CLI with every plugin's commands added."""
    boot.plugins.hook.jarvis_register_commands(cli=cli)
    return cli


def main() -> None:
    boot = bootstrap()  # once: every command reads it from the click context (`current_bootstrap`)
    build_cli(boot)(prog_name="jarvis", obj=boot)
