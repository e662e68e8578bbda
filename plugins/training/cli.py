"""`jarvis train`, `jarvis adapters merge|publish`: the train → serve loop from the command line.

`jarvis train --data FILE --name NAME [--publish http://127.0.0.1:8000]`
fine-tunes a LoRA on the served model (the embedded one by default), writes
the PEFT folder into the adapter root, and can register it with a running
server, which then answers under NAME without a restart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jarvis.auth import control_key
from jarvis.errors import ConfigError

console = Console(stderr=True)


def fail(problem: ConfigError) -> None:
    console.print(f"[bold red]✗ {problem.setting}[/]={problem.value!r}: {problem.problem}\n"
                  f"  [green]fix:[/] {problem.fix}")
    sys.exit(2)


def publish_adapter(server: str, name: str, path: Path, api_key: str | None = None) -> dict[str, Any]:
    """Register a finished adapter with a running Jarvis (it must lie inside that server's adapter root)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = server.rstrip("/").removesuffix("/v1")
    r = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                   headers=headers, timeout=300)
    if r.status_code != 200:
        raise click.ClickException(f"{base} refused adapter {name!r}: {r.status_code} {r.text}")
    return r.json()


TRAIN_FLAGS = [
    ("--data", dict(type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL, JSON or CSV dataset.")),
    ("--name", dict(help="Adapter name (served under it).")),
    ("--base-model", dict(type=click.Path(file_okay=False, path_type=Path),
                          help="transformers folder; default: the embedded model.")),
    ("--output-dir", dict(type=click.Path(file_okay=False, path_type=Path), help="Default: <adapter root>/<name>.")),
    ("--chat-format", dict(help="auto (the model's own) or a chat-format name.")),
    ("--rank", dict(type=int)), ("--alpha", dict(type=float)), ("--dropout", dict(type=float)),
    ("--target-modules", dict(help="Comma-separated module names.")),
    ("--dora/--no-dora", dict(default=None)), ("--qlora/--no-qlora", dict(default=None)),
    ("--learning-rate", dict(type=float)), ("--batch-size", dict(type=int)), ("--grad-accum", dict(type=int)),
    ("--epochs", dict(type=float)), ("--max-steps", dict(type=int)), ("--warmup-steps", dict(type=int)),
    ("--schedule", dict()), ("--max-length", dict(type=int)), ("--eval-fraction", dict(type=float)),
    ("--seed", dict(type=int)), ("--save-every", dict(type=int)), ("--log-every", dict(type=int)),
    ("--tracker", dict(help="mlflow (default, local ./mlruns) or none.")), ("--tracking-uri", dict()),
    ("--strict/--no-strict", dict(default=None, help="Stop at the first invalid example.")),
]


def with_train_flags(command: Any) -> Any:
    for flag, options in reversed(TRAIN_FLAGS):
        command = click.option(flag, **options)(command)
    return command


@click.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML or TOML file of settings; flags override it.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the output dir.")
@click.option("--publish", metavar="URL", help="Register the adapter with the Jarvis server at URL.")
@with_train_flags
def train_command(config_file: Path | None, resume: bool, publish: str | None, **flags: Any) -> None:
    """Fine-tune a LoRA adapter (LoRA, DoRA or QLoRA) and optionally publish it to a running server."""
    from jarvis.plugins.training.config import build_config

    if isinstance(flags.get("target_modules"), str):
        flags["target_modules"] = [m.strip() for m in flags["target_modules"].split(",") if m.strip()]
    try:
        config = build_config(config_file, **flags)
        run_training(config, resume=resume, publish=publish)
    except ConfigError as exc:
        fail(exc)


def run_training(config: Any, *, resume: bool = False, publish: str | None = None) -> Any:
    from jarvis.adapters import inspect_adapter
    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.backends.model_tools.devices import resolve_device
    from jarvis.bootstrap import current_bootstrap
    from jarvis.engine import ModelInfo
    from jarvis.plugins.training import trainer
    from jarvis.plugins.training.datasets import DatasetError, prepare_dataset, split_eval
    from jarvis.plugins.training.tracking import make_tracker

    boot = current_bootstrap()
    settings = boot.settings
    device = resolve_device(settings.device)
    folder = config.base_model or embedded_hf_model(settings.data_dir)
    with console.status(f"loading {folder.name} on {device} ..."):
        model, tokenizer = trainer.load_base(config, folder, device)
    fmt = boot.registries.chat_formats.get(config.chat_format)(ModelInfo(
        id=folder.name, max_model_len=config.max_length, architecture=model.config.model_type,
        chat_template=tokenizer.chat_template, eos_token=tokenizer.eos_token or ""))
    try:
        report = prepare_dataset(config.data, fmt, strict=config.strict)
    except DatasetError as exc:
        raise ConfigError("--data", str(config.data), str(exc), "fix the listed examples or drop --strict") from None
    for example_id, problem in report.invalid:
        console.print(f"  [yellow]skipped[/] {example_id}: {problem}")
    train_examples, eval_examples = split_eval(report.examples, config.eval_fraction, config.seed)
    train_items = trainer.tokenize_examples(train_examples, tokenizer, config.max_length)
    eval_items = trainer.tokenize_examples(eval_examples, tokenizer, config.max_length)
    console.print(f"{len(report.examples)} examples ({len(report.invalid)} invalid skipped): "
                  f"{len(train_items)} train, {len(eval_items)} eval; chat format {fmt.name}")

    model = trainer.attach_lora(model, config)
    output_dir = config.output_dir or settings.adapter_dir / config.name
    output_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(config.tracker, config.tracking_uri, config.name)
    tracker.log_params({**json.loads(config.model_dump_json()), "base_model": str(folder), "device": device,
                        "train_examples": len(train_items), "eval_examples": len(eval_items),
                        "invalid_examples": len(report.invalid)})
    progress = Progress(TextColumn("[bold]train[/] step {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)

    def on_step(r: Any) -> None:
        progress.update(task, completed=r.step, total=r.total_steps, loss=r.loss, tps=r.tokens / max(r.seconds, 1e-9))
        if r.step % config.log_every == 0 or r.step == r.total_steps:
            tracker.log_metrics({"loss": r.loss, "learning_rate": r.learning_rate}, r.step)

    status = "FAILED"
    try:
        with progress:
            task = progress.add_task("train", total=None, loss=float("nan"), tps=0.0)
            result = trainer.train(
                model, tokenizer, train_items, eval_items, config, output_dir, device, resume=resume,
                on_step=on_step, on_checkpoint=lambda p, s: tracker.log_artifacts(p, f"checkpoints/{p.name}"),
                on_eval=lambda s, v: tracker.log_metrics({"eval_loss": v}, s))
        final = {k: v for k, v in {"final_loss": result.last_loss, "eval_loss": result.eval_loss_after,
                                   "eval_loss_before": result.eval_loss_before,
                                   "train_tokens": result.train_tokens, "train_seconds": result.seconds}.items()
                 if v is not None}
        tracker.log_metrics(final, result.steps)
        tracker.log_files([output_dir / "adapter_config.json", output_dir / "adapter_model.safetensors"], "adapter")
        status = "FINISHED"
    finally:
        tracker.finish(status)
    console.print(f"[green]✓[/] adapter written to {output_dir} ({result.steps} steps, loss "
                  f"{result.first_loss:.4f} → {result.last_loss:.4f}"
                  + (f", eval loss {result.eval_loss_before:.4f} → {result.eval_loss_after:.4f}"
                     if result.eval_loss_before is not None and result.eval_loss_after is not None else "") + ")")
    adapter = inspect_adapter(config.name, output_dir, output_dir.parent, max_rank=4096)
    boot.plugins.relay.call("jarvis_adapter_published", adapter=adapter)
    if publish:
        publish_adapter(publish, config.name, output_dir, api_key=control_key(settings))
        console.print(f"[green]✓[/] published: {publish} now serves model {config.name!r}")
    click.echo(json.dumps({**result.__dict__, "tracker_run_id": tracker.run_id}))
    return result


@click.group("adapters")
def adapters() -> None:
    """Work with trained adapters: merge into the base, publish to a server."""


@adapters.command("publish")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--server", required=True, help="Jarvis base URL, e.g. http://127.0.0.1:8000")
@click.option("--name", help="Name to serve it under; default: the folder name.")
def publish_command(folder: Path, server: str, name: str | None) -> None:
    """Register a PEFT adapter FOLDER with a running Jarvis server."""
    from jarvis.settings import load_settings

    info = publish_adapter(server, name or folder.name, folder.resolve(), api_key=control_key(load_settings()))
    click.echo(json.dumps(info))


@adapters.command("merge")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Merged model folder.")
@click.option("--base-model", type=click.Path(file_okay=False, path_type=Path), help="Default: the embedded model.")
def merge_command(folder: Path, out: Path, base_model: Path | None) -> None:
    """Merge adapter FOLDER into its base and write a full transformers model to OUT."""
    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.backends.model_tools.lora_merge import merge_adapter
    from jarvis.settings import load_settings

    base = base_model or embedded_hf_model(load_settings().data_dir)
    with console.status(f"merging {folder.name} into {base.name} ..."):
        merge_adapter(base, folder, out)
    click.echo(str(out))


def register(cli: click.Group) -> None:
    cli.add_command(train_command)
    cli.add_command(adapters)
