"""Cost: instance hourly rates from a price table, training cost, inference cost per request and per 1M tokens.

- an instance's hourly rate, per resource type, is its GPUs × the GPU's rate,
  vCPUs × the vCPU rate, RAM GB × the GB rate, and disk GB × the GB-month rate
  ÷ 730 hours;
- training cost = hourly rate × training hours;
- inference cost per request = hourly rate ÷ (3600 × requests/s);
  per 1M output tokens = hourly rate ÷ (3600 × output tokens/s) × 1e6
  (throughput as `jarvis bench` measured it, at full load).

The defaults are the example rates in `prices.toml` beside this module;
`--prices FILE` is merged over them and `--rate NAME=VALUE` over both (a bare
NAME is a rate; `instances.NAME.FIELD=VALUE` changes an instance).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib

DEFAULT_PRICES = Path(__file__).with_name("prices.toml")
HOURS_PER_MONTH = 730.0
RESOURCES = ("gpu", "cpu", "ram", "storage")


class CostError(ValueError):
    """A price, an instance or a training duration is missing or wrong; the message says which and how to fix."""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_price_table(path: Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    table = tomllib.loads(DEFAULT_PRICES.read_text())
    if path is not None:
        table = merge(table, tomllib.loads(Path(path).read_text()))
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise CostError(f"--rate {item!r}: expected NAME=VALUE, e.g. --rate gpu_h100_hour=2.49")
        keys = name.strip().split(".") if "." in name else ["rates", name.strip()]
        try:
            value: Any = float(raw)
        except ValueError:
            value = raw.strip()
        node = table
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return table


def rate(table: dict[str, Any], name: str) -> float:
    try:
        return float(table["rates"][name])
    except KeyError:
        raise CostError(f"the price table has no rate {name!r}; add it to --prices FILE or pass "
                        f"--rate {name}=VALUE") from None


def instance_hourly(table: dict[str, Any], instance: str) -> dict[str, float]:
    """USD per hour of `instance`, per resource type and in total."""
    spec = table.get("instances", {}).get(instance)
    if spec is None:
        known = ", ".join(sorted(table.get("instances", {}))) or "none"
        raise CostError(f"unknown instance {instance!r} (known: {known}); define [instances.{instance}] in "
                        "--prices FILE")
    gpus = float(spec.get("gpus", 1 if spec.get("gpu") else 0))
    out = {
        "gpu": gpus * rate(table, f"gpu_{spec['gpu']}_hour") if gpus else 0.0,
        "cpu": float(spec.get("vcpus", 0)) * rate(table, "cpu_vcpu_hour"),
        "ram": float(spec.get("ram_gb", 0)) * rate(table, "ram_gb_hour"),
        "storage": float(spec.get("storage_gb", 0)) * rate(table, "storage_gb_month") / HOURS_PER_MONTH,
    }
    out["total"] = sum(out[k] for k in RESOURCES)
    return out


def scale(breakdown: dict[str, float], factor: float) -> dict[str, float]:
    return {k: v * factor for k, v in breakdown.items()}


def training_cost(hourly: dict[str, float], seconds: float) -> dict[str, float]:
    """Hourly rate × training duration, per resource type and in total."""
    return scale(hourly, seconds / 3600.0)


def inference_cost(hourly: dict[str, float], request_throughput: float | None,
                   output_tokens_per_s: float | None) -> dict[str, dict[str, float] | None]:
    """Cost per request and per 1M output tokens at the measured throughput."""
    return {
        "per_request": scale(hourly, 1 / (3600.0 * request_throughput)) if request_throughput else None,
        "per_1m_output_tokens": scale(hourly, 1e6 / (3600.0 * output_tokens_per_s)) if output_tokens_per_s else None,
    }


def read_training_run(path: Path) -> dict[str, Any]:
    """Duration (and losses when found) of a training run: the JSON line `jarvis train` prints (a file
    holding it, or its output captured whole), or an adapter folder whose training.json has the duration."""
    path = Path(path)
    found: dict[str, Any] = {"source": str(path)}
    candidates = [path / "training.json", path / "train_result.json"] if path.is_dir() else [path]
    for candidate in candidates:
        run = _json_with_seconds(candidate.read_text()) if candidate.is_file() else None
        if run is not None:
            found.update(seconds=float(run.get("seconds", run.get("train_seconds"))), steps=run.get("steps"),
                         train_tokens=run.get("train_tokens"), output_dir=run.get("output_dir"))
            break
    losses_file = Path(found.get("output_dir") or (path if path.is_dir() else path.parent)) / "training.json"
    if losses_file.is_file():
        try:
            found["losses"] = json.loads(losses_file.read_text()).get("losses")
        except json.JSONDecodeError:
            pass
    if "seconds" not in found:
        raise CostError(f"{path}: no training duration found; save what `jarvis train` prints "
                        "(`jarvis train ... > run.json`) and pass that file, or give --training-hours")
    return found


def _json_with_seconds(text: str) -> dict[str, Any] | None:
    """The whole text as JSON, else its last line that is a JSON object, if it carries a duration."""
    for chunk in [text, *reversed(text.splitlines())]:
        try:
            data = json.loads(chunk)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and ("seconds" in data or "train_seconds" in data):
            return data
    return None


def bench_configs(path: Path, label: str | None = None) -> list[dict[str, Any]]:
    """One configuration per (target, load level) of a `jarvis bench` JSON, at its measured throughput."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") != "bench":
        raise CostError(f"{path} is not a `jarvis bench` result (its 'kind' is {data.get('kind')!r})")
    runs = data["runs"]
    out = []
    for run in runs:
        name = label or run["target"]
        if len(runs) > 1:
            name += f" ({run['mode']} {run[run['mode']]:g})"
        out.append({"label": name, "bench": str(path), "request_throughput": run["summary"]["request_throughput"],
                    "output_tokens_per_s": run["summary"]["output_tokens_per_s"],
                    "latency_p50_s": run["summary"]["latency_s"]["p50"]})
    return out


def cost_report(table: dict[str, Any], configs: Sequence[dict[str, Any]], training: dict[str, Any] | None,
                training_instance: str | None) -> dict[str, Any]:
    """Every configuration's hourly rate and inference cost, and the training cost, per resource type."""
    default = table.get("defaults", {}).get("instance", "cpu-2")
    rows = []
    for config in configs:
        instance = config.get("instance") or default
        hourly = instance_hourly(table, instance)
        rows.append({**config, "instance": instance, "hourly": hourly,
                     **inference_cost(hourly, config.get("request_throughput"), config.get("output_tokens_per_s"))})
    report: dict[str, Any] = {"kind": "cost", "prices": table, "configs": rows,
                              "note": "rates are example rates unless --prices/--rate gave your own"}
    if training is not None:
        instance = training_instance or default
        hourly = instance_hourly(table, instance)
        report["training"] = {**training, "instance": instance, "hourly": hourly,
                              "hours": training["seconds"] / 3600.0,
                              "cost": training_cost(hourly, training["seconds"])}
    return report
