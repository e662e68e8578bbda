"""What each command's report says: the tables and plots of an evaluation, a benchmark and a cost report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jarvis.plugins.evaluation import plots
from jarvis.plugins.evaluation.report_files import Report, write_report


def evaluation_report(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    runs = result["runs"]
    labels = list(runs)
    report = Report(f"Jarvis evaluation: {' vs '.join(runs[k]['model'] for k in labels)}")
    report.text(f"source: {result['source']}; data: {result.get('data') or '–'}; tasks: {result.get('tasks') or '–'}; "
                f"decoding: {result.get('decoding')}; chat format: {result.get('chat_format') or '–'}")
    if any("perplexity" in r for r in runs.values()):
        report.heading("Perplexity")
        rows = [[label, r["model"], r["perplexity"]["perplexity"], r["perplexity"]["mean_nll"],
                 r["perplexity"]["scored_tokens"], r["perplexity"]["texts"]]
                for label, r in runs.items() if "perplexity" in r]
        diff = result.get("difference") or {}
        if "perplexity" in diff:
            rows.append(["adapter − base", "", diff["perplexity"], diff["mean_nll"], "", ""])
        report.table(["run", "model", "perplexity", "mean NLL", "scored tokens", "texts"], rows)
    if any("tasks" in r for r in runs.values()):
        report.heading("Task metrics")
        metrics = sorted({m for r in runs.values() if "tasks" in r for m in r["tasks"]["summary"]["metrics"]})
        rows = []
        for label, r in runs.items():
            if "tasks" in r:
                s = r["tasks"]["summary"]
                rows.append([label, s["cases"], s["errors"], s["pass_rate"], *[s["metrics"].get(m) for m in metrics]])
        diff = result.get("difference") or {}
        if "metrics" in diff:
            rows.append(["adapter − base", "", "", diff.get("pass_rate"), *[diff["metrics"].get(m) for m in metrics]])
        report.table(["run", "cases", "errors", "pass rate", *metrics], rows)
        report.heading("Per case")
        first = runs[labels[0]].get("tasks", {}).get("cases", [])
        case_rows = []
        for i, case in enumerate(first):
            row = [case["id"], str(case["expected"])[:40]]
            for label in labels:
                c = runs[label].get("tasks", {}).get("cases", [])[i] if "tasks" in runs[label] else {}
                row += [(c.get("output") or c.get("error") or "")[:40].replace("\n", " "), c.get("passed")]
            case_rows.append(row)
        report.table(["case", "expected", *[h for label in labels for h in (f"{label} output", "passed")]], case_rows)
    plot = plots.perplexity_comparison(runs, out_dir / f"{name}-comparison.png") if _ensure(out_dir) else None
    report.image(plot, "perplexity and task metrics per run")
    return write_report(out_dir, name, result, report)


def bench_report(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    _ensure(out_dir)
    report = Report("Jarvis serving benchmark")
    targets = ", ".join(f"{t['label']} = {t['url']} ({t['model']})" for t in result["targets"])
    s = result["settings"]
    report.text(f"targets: {targets}; {s['requests']} requests per level and target, max_tokens {s['max_tokens']}, "
                f"{s['prompts']} prompts, streaming; blocks per level: {s['rounds']}")
    report.heading("Results")
    rows = []
    for run in result["runs"]:
        m = run["summary"]
        rows.append([run["target"], f"{run['mode']} {run[run['mode']]:g}", m["requests"], m["successes"], m["errors"],
                     m["wall_s"], m["request_throughput"], m["output_tokens_per_s"], ms(m["latency_s"]["p50"]),
                     ms(m["latency_s"]["p95"]), ms(m["latency_s"]["p99"]), ms(m["ttft_s"]["p50"]),
                     ms(m["ttft_s"]["p95"]), ms(m["tpot_s"]["p50"]), ms(m["itl_s"]["p50"]), ms(m["itl_s"]["p99"])])
    report.table(["target", "load", "requests", "ok", "errors", "wall s", "req/s", "out tok/s", "lat p50 ms",
                  "lat p95 ms", "lat p99 ms", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms", "ITL p50 ms",
                  "ITL p99 ms"], rows)
    if result.get("comparison"):
        report.heading("Comparison (ratios)")
        report.table(["load", "of", "req/s", "out tok/s", "lat p50", "lat p95", "TTFT p50"],
                     [[f"{c['mode']} {c[c['mode']]:g}", c["of"], c["request_throughput"], c["output_tokens_per_s"],
                       c["latency_p50"], c["latency_p95"], c["ttft_p50"]] for c in result["comparison"]])
    report.heading("Resources (this machine)")
    res_rows = []
    for run in result["runs"]:
        r = run["resources"]
        gpu = "; ".join(f"{g['name']}: {_mean_max(g['util_percent'])} %, {_mean_max(g['mem_used_gb'])} GB"
                        for g in r.get("gpus", [])) or "no NVIDIA GPU"
        res_rows.append([run["target"], f"{run['mode']} {run[run['mode']]:g}", _mean_max(r["cpu_percent"]),
                         _mean_max(r["ram_used_gb"]), gpu])
    report.table(["target", "load", "CPU % mean/max", "RAM GB mean/max", "GPU util / memory"], res_rows)
    report.image(plots.latency_distribution(result, out_dir / f"{name}-latency.png"), "latency and TTFT distribution")
    report.image(plots.throughput_vs_load(result, out_dir / f"{name}-throughput.png"), "throughput vs load")
    return write_report(out_dir, name, result, report)


def cost_report_files(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    _ensure(out_dir)
    report = Report("Jarvis cost report")
    report.text("Rates are the plugin's EXAMPLE rates (prices.toml) unless --prices/--rate supplied your own: "
                + ", ".join(f"{k} = {v}" for k, v in result["prices"]["rates"].items()))
    training = result.get("training")
    if training:
        report.heading("Training")
        c = training["cost"]
        report.table(["instance", "duration s", "hours", "GPU $", "CPU $", "RAM $", "storage $", "total $"],
                     [[training["instance"], training["seconds"], training["hours"], c["gpu"], c["cpu"], c["ram"],
                       c["storage"], c["total"]]])
    if result["configs"]:
        report.heading("Inference, side by side")
        rows = []
        for cfg in result["configs"]:
            per_m, per_req = cfg.get("per_1m_output_tokens") or {}, cfg.get("per_request") or {}
            rows.append([cfg["label"], cfg["instance"], cfg["hourly"]["total"], cfg["request_throughput"],
                         cfg["output_tokens_per_s"], per_req.get("total"), per_m.get("total"), per_m.get("gpu"),
                         per_m.get("cpu"), per_m.get("ram"), per_m.get("storage")])
        report.table(["configuration", "instance", "$/hour", "req/s", "out tok/s", "$/request", "$/1M out tok",
                      "GPU", "CPU", "RAM", "storage"], rows)
    report.image(plots.cost_breakdown(result["configs"], (training or {}).get("losses"),
                                      out_dir / f"{name}-cost.png"),
                 "cost per 1M output tokens by resource; training loss")
    return write_report(out_dir, name, result, report)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _mean_max(stat: dict[str, float] | None) -> str:
    return "–" if not stat else f"{stat['mean']:.1f}/{stat['max']:.1f}"


def _ensure(out_dir: Path) -> bool:
    out_dir.mkdir(parents=True, exist_ok=True)
    return True
