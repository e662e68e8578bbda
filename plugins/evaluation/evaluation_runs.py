"""The runs behind `jarvis eval perplexity|tasks|compare`: one model, or base and adapter on identical data.

A target is local (a transformers folder, + a PEFT adapter) or an endpoint
(URL + served model name; an adapter is its own model name there). Compare
scores the same texts, sends the same prompts with the same decoding settings
(temperature, top_p, max_tokens, seed) to both, and reports each metric side
by side with `adapter - base`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jarvis.plugins.evaluation.eval_datasets import ScoringText, TaskCase, load_scoring_texts, needs_chat_format
from jarvis.plugins.evaluation.task_metrics import aggregate, score_case

console = Console(stderr=True)


@dataclass
class Decoding:
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def resolve_chat_format(name: str | None, model_info: Any | None) -> Any:
    """A chat format by name (`auto` needs the local model's info), as the server would build it."""
    from jarvis.bootstrap import current_bootstrap
    from jarvis.engine import ModelInfo

    info = model_info or ModelInfo(id="endpoint", max_model_len=0)
    return current_bootstrap().registries.chat_formats.get(name or "auto")(info)


def scoring_texts_for(data: Path, chat_format_name: str | None,
                      model_info: Any | None) -> tuple[list[ScoringText], Any]:
    fmt = None
    if needs_chat_format(data):
        if model_info is None and not chat_format_name:
            raise click_error(f"{data} holds chat/instruction records; with --url name the server's chat format "
                              "(--chat-format gemma, chatml, llama3, mistral)")
        fmt = resolve_chat_format(chat_format_name, model_info)
    return load_scoring_texts(data, fmt), fmt


def click_error(message: str) -> Exception:
    import click

    return click.ClickException(message)


def score_perplexity(target: Any, texts: Sequence[ScoringText], label: str, **window: Any) -> dict[str, Any]:
    with progress_bar() as bar:
        task = bar.add_task(f"perplexity {label}", total=len(texts))
        started = time.monotonic()
        result = target.perplexity(texts, progress=lambda: bar.advance(task), **window)
    out = result.to_dict()
    out["seconds"] = time.monotonic() - started
    return out


def tasks_of(generate: Callable[[TaskCase], dict[str, Any]], cases: Sequence[TaskCase], label: str) -> dict[str, Any]:
    results = []
    with progress_bar() as bar:
        task = bar.add_task(f"tasks {label}", total=len(cases))
        for case in cases:
            started = time.monotonic()
            row: dict[str, Any] = {"id": case.id, "expected": case.expected, "checks": case.checks}
            try:
                answer = generate(case)
                row.update(output=answer["text"], completion_tokens=answer.get("completion_tokens"),
                           **score_case(answer["text"], case.expected, case.checks, case.options))
            except Exception as exc:  # noqa: BLE001 - a failed case is a result, not the end of the run
                row.update(output=None, error=f"{type(exc).__name__}: {exc}", scores={}, passed=False)
            row["seconds"] = time.monotonic() - started
            results.append(row)
            bar.advance(task)
    return {"summary": aggregate(results), "cases": results}


def local_generator(model: Any, chat_format: Any, decoding: Decoding) -> Callable[[TaskCase], dict[str, Any]]:
    def generate(case: TaskCase) -> dict[str, Any]:
        prompt = case.prompt if case.prompt is not None else chat_format(case.messages, True)
        stop = chat_format.stop if case.prompt is None and chat_format else ()
        return model.generate(prompt, max_tokens=decoding.max_tokens, temperature=decoding.temperature,
                              top_p=decoding.top_p, seed=decoding.seed, stop=stop)
    return generate


def endpoint_generator(model: Any, decoding: Decoding) -> Callable[[TaskCase], dict[str, Any]]:
    def generate(case: TaskCase) -> dict[str, Any]:
        return model.generate(case.prompt, case.messages, max_tokens=decoding.max_tokens,
                              temperature=decoding.temperature, top_p=decoding.top_p, seed=decoding.seed)
    return generate


def differences(base: dict[str, Any], adapter: dict[str, Any]) -> dict[str, Any]:
    """adapter - base for every number both runs report (perplexity, mean NLL, task metrics, pass rate)."""
    diff: dict[str, Any] = {}
    if "perplexity" in base and "perplexity" in adapter:
        b, a = base["perplexity"]["perplexity"], adapter["perplexity"]["perplexity"]
        diff["perplexity"] = a - b
        diff["perplexity_ratio"] = a / b if b else None
        diff["mean_nll"] = adapter["perplexity"]["mean_nll"] - base["perplexity"]["mean_nll"]
    if "tasks" in base and "tasks" in adapter:
        sb, sa = base["tasks"]["summary"], adapter["tasks"]["summary"]
        diff["metrics"] = {k: sa["metrics"][k] - sb["metrics"][k] for k in sb["metrics"] if k in sa["metrics"]}
        if sb["pass_rate"] is not None and sa["pass_rate"] is not None:
            diff["pass_rate"] = sa["pass_rate"] - sb["pass_rate"]
    return diff


def run_local(base: Path, adapter: Path | None, data: Path | None, tasks: Sequence[TaskCase] | None,
              decoding: Decoding, chat_format: str | None, max_length: int | None, stride: int | None,
              device: str = "cpu", both: bool = False) -> dict[str, Any]:
    """Evaluate a local folder; with `both`, the base (adapter switched off) and base+adapter alike."""
    from jarvis.plugins.evaluation.local_model import LocalModel

    with console.status(f"loading {base.name}{' + ' + adapter.name if adapter else ''} ..."):
        model = LocalModel(base, adapter, device=device)
    info = model.model_info()
    texts, fmt = scoring_texts_for(data, chat_format, info) if data else ([], None)
    if tasks and fmt is None:
        fmt = resolve_chat_format(chat_format, info)
    runs: dict[str, dict[str, Any]] = {}
    labels = ["base", "adapter"] if both else ["adapter" if adapter else "base"]
    for label in labels:
        run: dict[str, Any] = {"model": str(adapter if label == "adapter" else base)}
        with model.base_only() if label == "base" else contextlib.nullcontext():
            if texts:
                run["perplexity"] = score_perplexity(model, texts, label, max_length=max_length, stride=stride)
            if tasks:
                run["tasks"] = tasks_of(local_generator(model, fmt, decoding), tasks, label)
        runs[label] = run
    return {"source": "local", "chat_format": getattr(fmt, "name", None), "runs": runs}


def run_endpoint(url: str, models: dict[str, str | None], data: Path | None, tasks: Sequence[TaskCase] | None,
                 decoding: Decoding, chat_format: str | None, api_key: str | None = None) -> dict[str, Any]:
    from jarvis.plugins.evaluation.endpoint_model import EndpointModel

    texts, fmt = scoring_texts_for(data, chat_format, None) if data else ([], None)
    runs: dict[str, dict[str, Any]] = {}
    for label, name in models.items():
        target = EndpointModel(url, name, api_key)
        run: dict[str, Any] = {"model": target.model, "url": target.url}
        try:
            if texts:
                run["perplexity"] = score_perplexity(target, texts, label)
            if tasks:
                run["tasks"] = tasks_of(endpoint_generator(target, decoding), tasks, label)
        finally:
            target.close()
        runs[label] = run
    return {"source": "endpoint", "chat_format": getattr(fmt, "name", None), "runs": runs}
