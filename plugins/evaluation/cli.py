"""`jarvis eval perplexity|tasks|compare|cost` and `jarvis bench`: the evaluation plugin's commands.

Every command writes NAME.json, NAME.md and NAME.html (+ PNGs) into
`--output` (default ./jarvis-reports) and prints a short summary. A local
target is a transformers folder (default: the embedded model) plus an
optional PEFT adapter folder; with `--url` the target is any OpenAI-compatible
server and `--model`/`--base`/`--adapter` are served model names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console

console = Console(stderr=True)
OUTPUT = click.option("--output", "output", type=click.Path(file_okay=False, path_type=Path),
                      default=Path("jarvis-reports"), show_default=True,
                      help="Folder for the JSON/MD/HTML/PNG reports.")
MODEL = click.option("--model", help="Local folder (default: the embedded model) or served model name.")
ADAPTER = click.option("--adapter", help="PEFT adapter folder (local) or the adapter's served name (--url).")
URL = click.option("--url", help="OpenAI-compatible server (http://host:8000 or .../v1); unset: run locally.")
API_KEY = click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer token for --url (env OPENAI_API_KEY).")
CHAT_FORMAT = click.option("--chat-format", help="Render chat/instruction records with this format "
                           "(local default: auto = the model's own; needed with --url).")
WINDOW = [click.option("--max-length", type=int, help="Window in tokens (local; default: the model's context)."),
          click.option("--stride", type=int, help="New tokens per window for long texts (local; default: half the "
                       "window). An endpoint scores each text whole.")]
DECODING = [click.option("--max-tokens", type=int, default=32, show_default=True),
            click.option("--temperature", type=float, default=0.0, show_default=True),
            click.option("--top-p", type=float, default=1.0, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True)]
DEVICE = click.option("--device", default="cpu", show_default=True, help="Local torch device.")


def options(*decorators: Any) -> Any:
    def apply(command: Any) -> Any:
        for decorator in reversed([d for group in decorators for d in (group if isinstance(group, list) else [group])]):
            command = decorator(command)
        return command
    return apply


def local_base(model: str | None) -> Path:
    if model:
        return Path(model)
    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.settings import load_settings

    return embedded_hf_model(load_settings().data_dir)


def run_evaluation(*, data: Path | None, tasks_file: Path | None, url: str | None, base: str | None,
                   adapter: str | None, both: bool, decoding: dict[str, Any], chat_format: str | None,
                   max_length: int | None, stride: int | None, device: str, api_key: str | None) -> dict[str, Any]:
    from jarvis.plugins.evaluation.eval_datasets import EvalDataError, load_task_cases
    from jarvis.plugins.evaluation.evaluation_runs import Decoding, differences, run_endpoint, run_local

    settings = Decoding(**decoding)
    try:
        cases = load_task_cases(tasks_file) if tasks_file else None
        if url:
            models = {"base": base, "adapter": adapter} if both else {"adapter" if adapter else "base": adapter or base}
            result = run_endpoint(url, models, data, cases, settings, chat_format, api_key)
        else:
            result = run_local(local_base(base), Path(adapter) if adapter else None, data, cases, settings,
                               chat_format, max_length, stride, device, both=both)
    except (EvalDataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    result.update(kind="compare" if both else "evaluation", data=str(data) if data else None,
                  tasks=str(tasks_file) if tasks_file else None, decoding=settings.__dict__)
    if both:
        result["difference"] = differences(result["runs"]["base"], result["runs"]["adapter"])
    return result


def finish(result: dict[str, Any], paths: dict[str, Path], lines: list[str]) -> None:
    for line in lines:
        console.print(line)
    console.print(f"[green]✓[/] reports: {paths['json']}, {paths['markdown']}, {paths['html']}")
    click.echo(str(paths["json"]))


def run_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for label, run in result["runs"].items():
        parts = [f"[bold]{label}[/] {run['model']}:"]
        if "perplexity" in run:
            p = run["perplexity"]
            parts.append(f"perplexity {p['perplexity']:.4f} ({p['scored_tokens']} tokens)")
        if "tasks" in run:
            s = run["tasks"]["summary"]
            parts.append(f"pass rate {s['pass_rate']} " + " ".join(f"{k} {v:.3f}" for k, v in s["metrics"].items()))
        lines.append(" ".join(parts))
    diff = result.get("difference") or {}
    if "perplexity" in diff:
        lines.append(f"adapter − base: perplexity {diff['perplexity']:+.4f} (×{diff['perplexity_ratio']:.3g})")
    return lines


@click.group("eval")
def eval_group() -> None:
    """Evaluate models and adapters: perplexity, task metrics, base vs adapter, cost."""


@eval_group.command("perplexity")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options(URL, MODEL, ADAPTER,
         CHAT_FORMAT, WINDOW, DEVICE, API_KEY, OUTPUT)
def perplexity_command(data: Path, url: str | None, model: str | None, adapter: str | None, chat_format: str | None,
                       max_length: int | None, stride: int | None, device: str, api_key: str | None,
                       output: Path) -> None:
    """Perplexity of a model (or model + adapter) on DATA: token-weighted over the whole dataset."""
    from jarvis.plugins.evaluation.report_builders import evaluation_report

    result = run_evaluation(data=data, tasks_file=None, url=url, base=model, adapter=adapter, both=False,
                            decoding={}, chat_format=chat_format, max_length=max_length, stride=stride,
                            device=device, api_key=api_key)
    finish(result, evaluation_report(result, output, "perplexity"), run_lines(result))


@eval_group.command("tasks")
@click.argument("cases", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options(URL, MODEL, ADAPTER,
         CHAT_FORMAT, DECODING, DEVICE, API_KEY, OUTPUT)
def tasks_command(cases: Path, url: str | None, model: str | None, adapter: str | None, chat_format: str | None,
                  max_tokens: int, temperature: float, top_p: float, seed: int, device: str, api_key: str | None,
                  output: Path) -> None:
    """Generate an answer for each case of CASES and check it (exact, contains, regex, numeric, json, rouge)."""
    from jarvis.plugins.evaluation.report_builders import evaluation_report

    result = run_evaluation(data=None, tasks_file=cases, url=url, base=model, adapter=adapter, both=False,
                            decoding=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed),
                            chat_format=chat_format, max_length=None, stride=None, device=device, api_key=api_key)
    finish(result, evaluation_report(result, output, "tasks"), run_lines(result))


@eval_group.command("compare")
@click.argument("data", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options(click.option("--base", help="Local base folder (default: the embedded model) or served base name."),
         click.option("--adapter", required=True, help="PEFT adapter folder (local) or its served name (--url)."),
         click.option("--tasks", "tasks_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                      help="Task cases to generate and check for both."),
         URL, CHAT_FORMAT, WINDOW, DECODING, DEVICE, API_KEY, OUTPUT)
def compare_command(data: Path | None, base: str | None, adapter: str, tasks_file: Path | None, url: str | None,
                    chat_format: str | None, max_length: int | None, stride: int | None, max_tokens: int,
                    temperature: float, top_p: float, seed: int, device: str, api_key: str | None,
                    output: Path) -> None:
    """Base vs base+adapter on identical data and decoding: perplexity on DATA, task metrics on --tasks."""
    from jarvis.plugins.evaluation.report_builders import evaluation_report

    if data is None and tasks_file is None:
        raise click.UsageError("give DATA (perplexity), --tasks CASES, or both")
    result = run_evaluation(data=data, tasks_file=tasks_file, url=url, base=base, adapter=adapter, both=True,
                            decoding=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed),
                            chat_format=chat_format, max_length=max_length, stride=stride, device=device,
                            api_key=api_key)
    finish(result, evaluation_report(result, output, "compare"), run_lines(result))


@eval_group.command("cost")
@click.argument("benches", nargs=-1, metavar="[LABEL=]BENCH_JSON[@INSTANCE]...")
@click.option("--training", "training_path", type=click.Path(exists=True, path_type=Path),
              help="What `jarvis train` printed (saved to a file), or an adapter folder.")
@click.option("--training-hours", type=float, help="Training duration, when no training output is at hand.")
@click.option("--training-instance", help="Instance the training ran on (default: the table's default).")
@click.option("--instance", help="Instance for every configuration without its own @INSTANCE.")
@click.option("--prices", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML price table merged over the built-in example rates.")
@click.option("--rate", "rates", multiple=True, metavar="NAME=VALUE", help="Override one rate (repeatable).")
@OUTPUT
def cost_command(benches: tuple[str, ...], training_path: Path | None, training_hours: float | None,
                 training_instance: str | None, instance: str | None, prices: Path | None, rates: tuple[str, ...],
                 output: Path) -> None:
    """Training and inference cost side by side: hourly rate × duration, hourly rate ÷ measured throughput."""
    from jarvis.plugins.evaluation import cost
    from jarvis.plugins.evaluation.report_builders import cost_report_files

    try:
        table = cost.load_price_table(prices, rates)
        configs = []
        for spec in benches:
            label, _, rest = spec.rpartition("=") if "=" in spec else (None, "", spec)
            path, _, own_instance = rest.partition("@")
            for config in cost.bench_configs(Path(path), label or None):
                configs.append({**config, "instance": own_instance or instance})
        training = cost.read_training_run(training_path) if training_path else None
        if training is None and training_hours is not None:
            training = {"source": "--training-hours", "seconds": training_hours * 3600}
        result = cost.cost_report(table, configs, training, training_instance)
    except (cost.CostError, OSError, json.JSONDecodeError) as exc:
        raise click.ClickException(str(exc)) from None
    lines = [f"{c['label']} on {c['instance']}: ${c['hourly']['total']:.4f}/h, "
             + (f"${c['per_request']['total']:.6f}/request, " if c.get("per_request") else "")
             + (f"${c['per_1m_output_tokens']['total']:.2f}/1M output tokens" if c.get("per_1m_output_tokens") else "")
             for c in result["configs"]]
    if "training" in result:
        t = result["training"]
        lines.append(f"training on {t['instance']}: {t['seconds']:.1f} s → ${t['cost']['total']:.6f}")
    finish(result, cost_report_files(result, output, "cost"), lines)


def parse_levels(text: str | None, kind: type) -> list[Any] | None:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a number or a comma-separated list") from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"{text!r}: values must be positive")
    return values


@click.command("bench")
@click.option("--url", required=True, help="OpenAI-compatible server: Jarvis or a raw engine.")
@click.option("--model", help="Model name to request (default: the first the server lists).")
@click.option("--requests", "n_requests", type=int, default=32, show_default=True, help="Requests per load level.")
@click.option("--concurrency", help="Concurrent requests; a list (1,4,8) runs each level.")
@click.option("--rate", help="Poisson arrivals in requests/s instead of a fixed concurrency; a list runs each.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL of {\"prompt\"} or a text file with one prompt per line (default: a built-in set).")
@click.option("--chat", is_flag=True, help="Use /v1/chat/completions instead of /v1/completions.")
@click.option("--compare", "compare_url", help="A second server, run in the same benchmark, alternating.")
@click.option("--compare-model", help="Model name on the --compare server (default: its first).")
@click.option("--label", help="Name of the first target in the report (default: its URL).")
@click.option("--compare-label", help="Name of the second target.")
@click.option("--rounds", type=int, help="Alternating blocks per level (default: 2 with --compare, else 1).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Unmeasured requests per target first.")
@click.option("--seed", type=int, default=0, show_default=True)
@API_KEY
@OUTPUT
def bench_command(url: str, model: str | None, n_requests: int, concurrency: str | None, rate: str | None,
                  max_tokens: int, prompts: Path | None, chat: bool, compare_url: str | None,
                  compare_model: str | None, label: str | None, compare_label: str | None, rounds: int | None,
                  warmup: int, seed: int, api_key: str | None, output: Path) -> None:
    """Drive an OpenAI-compatible server with streamed requests: latency, TTFT, TPOT, ITL, throughput, resources."""
    from jarvis.plugins.evaluation.bench_load import Target, load_prompts
    from jarvis.plugins.evaluation.endpoint_model import EndpointError, api_base, list_models
    from jarvis.plugins.evaluation.report_builders import bench_report
    from jarvis.plugins.evaluation.serving_bench import run_benchmark

    if concurrency and rate:
        raise click.UsageError("give --concurrency or --rate, not both")
    if n_requests < 1:
        raise click.BadParameter("--requests must be at least 1")
    try:
        targets = [Target(label or url, api_base(url), model or list_models(url, api_key)[0], chat, api_key)]
        if compare_url:
            targets.append(Target(compare_label or compare_url, api_base(compare_url),
                                  compare_model or list_models(compare_url, api_key)[0], chat, api_key))
    except (EndpointError, IndexError, OSError) as exc:
        raise click.ClickException(f"cannot list the served models: {exc}; pass --model") from None
    if len(targets) == 2 and targets[0].label == targets[1].label:
        targets[1].label += " (2)"
    result = run_benchmark(targets, load_prompts(prompts), requests=n_requests,
                           concurrencies=parse_levels(concurrency, int), rates=parse_levels(rate, float),
                           max_tokens=max_tokens, seed=seed, rounds=rounds, warmup=warmup)
    lines = []
    for run in result["runs"]:
        m = run["summary"]
        lines.append(f"{run['target']} {run['mode']} {run[run['mode']]:g}: {m['requests']} requests "
                     f"({m['errors']} errors) in {m['wall_s']:.2f} s → {m['request_throughput']:.2f} req/s, "
                     f"{m['output_tokens_per_s'] or 0:.1f} tok/s, p50 {1000 * (m['latency_s']['p50'] or 0):.0f} ms, "
                     f"TTFT p50 {1000 * (m['ttft_s']['p50'] or 0):.0f} ms")
    for c in result.get("comparison") or []:
        lines.append(f"{c['mode']} {c[c['mode']]:g} {c['of']}: req/s ×{c['request_throughput'] or 0:.3f}, "
                     f"latency p50 ×{c['latency_p50'] or 0:.3f}")
    finish(result, bench_report(result, output, "bench"), lines)


def register(cli: click.Group) -> None:
    cli.add_command(eval_group)
    cli.add_command(bench_command)
