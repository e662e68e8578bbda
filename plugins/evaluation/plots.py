"""PNG plots for the reports (matplotlib, Agg backend: no display needed).

Latency and TTFT distributions, throughput against concurrency (or rate)
when a benchmark ran several levels, perplexity and task metrics of base vs
adapter, and training loss with cost per 1M output tokens by resource type.
Each function writes one PNG and returns its path (None when there is
nothing to draw).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _level(run: dict[str, Any]) -> str:
    return f"{run['mode']} {run[run['mode']]:g}"


def latency_distribution(bench: dict[str, Any], path: Path) -> Path | None:
    runs = [r for r in bench["runs"] if any(not t["error"] for t in r["raw"])]
    if not runs:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        ok = [t for t in run["raw"] if not t["error"]]
        label = f"{run['target']}, {_level(run)}"
        left.hist([t["latency_s"] * 1000 for t in ok], bins=20, alpha=0.55, label=label)
        right.hist([t["ttft_s"] * 1000 for t in ok if t["ttft_s"] is not None], bins=20, alpha=0.55, label=label)
    for ax, what in ((left, "request latency"), (right, "time to first token")):
        ax.set_xlabel(f"{what} (ms)")
        ax.set_ylabel("requests")
        ax.set_title(what)
        ax.legend(fontsize=8)
    return _save(fig, path)


def throughput_vs_load(bench: dict[str, Any], path: Path) -> Path | None:
    levels = {r[r["mode"]] for r in bench["runs"]}
    if len(levels) < 2:
        return None
    plt = _pyplot()
    mode = bench["runs"][0]["mode"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for target in dict.fromkeys(r["target"] for r in bench["runs"]):
        runs = sorted((r for r in bench["runs"] if r["target"] == target), key=lambda r: r[mode])
        x = [r[mode] for r in runs]
        left.plot(x, [r["summary"]["request_throughput"] or 0 for r in runs], marker="o", label=target)
        right.plot(x, [r["summary"]["output_tokens_per_s"] or 0 for r in runs], marker="o", label=target)
    left.set_ylabel("requests / s")
    right.set_ylabel("output tokens / s")
    for ax in (left, right):
        ax.set_xlabel("concurrency" if mode == "concurrency" else "offered rate (requests / s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("throughput vs " + mode)
    return _save(fig, path)


def perplexity_comparison(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    with_ppl = {k: v for k, v in runs.items() if "perplexity" in v}
    with_tasks = {k: v for k, v in runs.items() if "tasks" in v}
    if not with_ppl and not with_tasks:
        return None
    plt = _pyplot()
    panels = int(bool(with_ppl)) + int(bool(with_tasks))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    if with_ppl:
        ax = axes.pop(0)
        labels = list(with_ppl)
        values = [with_ppl[k]["perplexity"]["perplexity"] for k in labels]
        bars = ax.bar(labels, values, color=colors[:len(labels)])
        ax.bar_label(bars, fmt="%.2f")
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # an adapter can move perplexity by orders of magnitude
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("perplexity")
    if with_tasks:
        ax = axes.pop(0)
        labels = list(with_tasks)
        metrics = sorted({m for v in with_tasks.values() for m in v["tasks"]["summary"]["metrics"]})
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            summary = with_tasks[label]["tasks"]["summary"]["metrics"]
            ax.bar([j + i * width for j in range(len(metrics))], [summary.get(m, 0) for m in metrics], width,
                   label=label, color=colors[i % len(colors)])
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("mean score")
        ax.set_title("task metrics")
        ax.legend(fontsize=8)
    return _save(fig, path)


def cost_breakdown(configs: Sequence[dict[str, Any]], losses: Sequence[float] | None, path: Path) -> Path | None:
    priced = [c for c in configs if c.get("per_1m_output_tokens")]
    if not priced and not losses:
        return None
    plt = _pyplot()
    panels = int(bool(priced)) + int(bool(losses))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if priced:
        ax = axes.pop(0)
        bottom = [0.0] * len(priced)
        names = [f"{c['label']}\n{c['instance']}" for c in priced]
        for resource in ("gpu", "cpu", "ram", "storage"):
            values = [c["per_1m_output_tokens"][resource] for c in priced]
            ax.bar(names, values, bottom=bottom, label=resource)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("USD per 1M output tokens")
        ax.set_title("inference cost by resource")
        ax.tick_params(axis="x", labelrotation=15)
        ax.legend(fontsize=8)
    if losses:
        ax = axes.pop(0)
        ax.plot(range(1, len(losses) + 1), losses, marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
    return _save(fig, path)
