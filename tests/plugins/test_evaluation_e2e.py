"""End to end with real engines: a short `jarvis train` on the facts set lowers perplexity on held-out facts
(`jarvis eval compare`), `jarvis bench` drives a real llama.cpp Jarvis, and `jarvis eval cost` prices both."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def facts_training(tmp_path_factory, jarvis_cli) -> dict:
    """A LoRA trained by `jarvis train` for a few steps on tests/data/train_small.jsonl (short factual
    answers in the Gemma chat format); what the command printed is saved beside it."""
    root = tmp_path_factory.mktemp("facts-training")
    run = jarvis_cli("train", "--data", str(DATA / "train_small.jsonl"), "--name", "facts", "--output-dir",
                     str(root / "facts"), "--max-steps", "4", "--batch-size", "2", "--learning-rate", "2e-3",
                     "--tracker", "none", "--eval-fraction", "0", cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = root / "train-output.json"
    printed.write_text(run.stdout)
    return {"adapter": root / "facts", "printed": printed, "result": json.loads(run.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="module")
def llama_server(jarvis_server):
    server = jarvis_server()  # the default engine, llama.cpp, with the embedded model
    assert server.health()["status"] == "ready", server.log()
    return server


def read_png(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert plt.imread(path).ndim == 3


def test_adapter_lowers_perplexity_on_held_out_facts(facts_training, tmp_path, jarvis_cli):
    out = tmp_path / "compare"
    run = jarvis_cli("eval", "compare", str(DATA / "eval_facts_heldout.jsonl"), "--adapter",
                     str(facts_training["adapter"]), "--tasks", str(DATA / "eval_facts_tasks.jsonl"),
                     "--max-tokens", "4", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    base, adapter = report["runs"]["base"], report["runs"]["adapter"]
    assert base["perplexity"]["scored_tokens"] == adapter["perplexity"]["scored_tokens"] > 0
    assert adapter["perplexity"]["perplexity"] < base["perplexity"]["perplexity"]
    assert report["difference"]["perplexity"] == pytest.approx(
        adapter["perplexity"]["perplexity"] - base["perplexity"]["perplexity"])
    assert report["chat_format"] == "auto(gemma)"  # rendered as the training rendered it
    # the same cases, the same decoding, every case kept with its scores
    assert [c["id"] for c in base["tasks"]["cases"]] == [c["id"] for c in adapter["tasks"]["cases"]]
    assert report["decoding"] == {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    assert all(set(c["scores"]) == set(c["checks"]) for c in adapter["tasks"]["cases"])
    assert adapter["tasks"]["summary"]["metrics"]["rouge"] >= base["tasks"]["summary"]["metrics"]["rouge"]
    for name in ("compare.md", "compare.html"):
        assert "Perplexity" in (out / name).read_text()
    read_png(out / "compare-comparison.png")
    print(f"\nheld-out perplexity: base {base['perplexity']['perplexity']:.1f}, "
          f"adapter {adapter['perplexity']['perplexity']:.2f}")


@pytest.fixture(scope="module")
def bench_run(llama_server, tmp_path_factory, jarvis_cli) -> Path:
    out = tmp_path_factory.mktemp("bench")
    run = jarvis_cli("bench", "--url", llama_server.base_url, "--requests", "6", "--concurrency", "1,3",
                     "--max-tokens", "6", "--label", "llama.cpp", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_bench_counts_percentiles_and_throughput_follow_the_raw_timings(bench_run):
    report = json.loads((bench_run / "bench.json").read_text())
    assert [(r["mode"], r["concurrency"]) for r in report["runs"]] == [("concurrency", 1), ("concurrency", 3)]
    for run in report["runs"]:
        s, raw = run["summary"], run["raw"]
        assert s["requests"] == len(raw) == 6 == s["successes"] + s["errors"]
        assert s["errors"] == 0, s["error_samples"]
        for metric in ("latency_s", "ttft_s", "tpot_s", "itl_s"):
            d = s[metric]
            assert d["min"] <= d["p50"] <= d["p95"] <= d["p99"] <= d["max"], metric
        wall = max(t["end_s"] for t in raw) - min(t["start_s"] for t in raw)
        assert s["wall_s"] == pytest.approx(wall)
        assert s["request_throughput"] == pytest.approx(len(raw) / wall)
        assert s["output_tokens_per_s"] == pytest.approx(sum(t["output_tokens"] for t in raw) / wall)
        assert all(0 < t["ttft_s"] <= t["latency_s"] and t["output_tokens"] > 0 for t in raw)
        assert run["resources"]["samples"] > 0 and run["resources"]["cpu_percent"]["max"] >= 0
    for name in ("bench.md", "bench.html"):
        assert (bench_run / name).stat().st_size > 500
    read_png(bench_run / "bench-latency.png")
    read_png(bench_run / "bench-throughput.png")


def test_bench_compare_alternates_two_targets_at_a_poisson_rate(llama_server, tmp_path, jarvis_cli):
    out = tmp_path / "bench-compare"
    run = jarvis_cli("bench", "--url", llama_server.base_url, "--compare", llama_server.v1, "--requests", "4",
                     "--rate", "20", "--max-tokens", "4", "--chat", "--warmup", "0", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert len(report["targets"]) == 2 and report["settings"]["rounds"] == 2
    first, second = report["runs"]
    assert first["mode"] == "rate" and first["rate"] == 20
    blocks = sorted({t["block"] for r in report["runs"] for t in r["raw"]})
    assert blocks == [0, 1, 2, 3]  # A B, then B A
    assert {t["block"] for t in first["raw"]} == {0, 3} and {t["block"] for t in second["raw"]} == {1, 2}
    ratio = report["comparison"][0]
    assert ratio["request_throughput"] == pytest.approx(
        second["summary"]["request_throughput"] / first["summary"]["request_throughput"])


def test_cost_report_prices_the_training_run_and_the_bench_run(facts_training, bench_run, tmp_path, jarvis_cli):
    out = tmp_path / "cost"
    run = jarvis_cli("eval", "cost", f"llama.cpp={bench_run / 'bench.json'}@cpu-2",
                     f"{bench_run / 'bench.json'}@h100-x1", "--training", str(facts_training["printed"]),
                     "--training-instance", "h100-x1", "--rate", "gpu_h100_hour=2.5", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "cost.json").read_text())
    bench = json.loads((bench_run / "bench.json").read_text())
    h100 = 2.5 + 16 * 0.035 + 128 * 0.0045 + 64 * 0.08 / 730
    training = report["training"]
    assert training["seconds"] == pytest.approx(facts_training["result"]["seconds"])
    assert training["cost"]["total"] == pytest.approx(h100 * training["seconds"] / 3600)
    assert training["losses"] and len(training["losses"]) == 4
    assert len(report["configs"]) == 4  # 2 price points × 2 concurrency levels
    for config, run_ in zip(report["configs"], bench["runs"] * 2):
        hourly = config["hourly"]["total"]
        assert hourly == pytest.approx(h100 if config["instance"] == "h100-x1"
                                       else 2 * 0.035 + 8 * 0.0045 + 50 * 0.08 / 730)
        s = run_["summary"]
        assert config["per_request"]["total"] == pytest.approx(hourly / 3600 / s["request_throughput"])
        assert config["per_1m_output_tokens"]["total"] == pytest.approx(hourly / 3600 / s["output_tokens_per_s"] * 1e6)
        parts = config["per_1m_output_tokens"]
        assert math.isclose(parts["gpu"] + parts["cpu"] + parts["ram"] + parts["storage"], parts["total"])
    assert "EXAMPLE" in (out / "cost.md").read_text()
    read_png(out / "cost-cost.png")
