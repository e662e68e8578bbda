"""Task checks, benchmark statistics and cost formulas against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from jarvis.plugins.evaluation import cost
from jarvis.plugins.evaluation.bench_load import RequestTiming, percentile, summarise
from jarvis.plugins.evaluation.task_metrics import aggregate, score_case


def test_checks():
    assert score_case("  The answer is: BLUE.<end_of_turn>", "The answer is blue", ["exact"])["passed"] is True
    assert score_case("Blue, I think", "blue", ["exact"])["passed"] is False
    assert score_case("I think it is Blue, really", "blue.", ["contains"])["passed"] is True
    assert score_case("order #A-1234 shipped", None, ["regex"], {"pattern": r"#A-\d{4}"})["passed"] is True
    assert score_case("about 3.14159 or so", 3.1416, ["numeric"], {"tolerance": 1e-3})["passed"] is True
    assert score_case("about 3.2", "3.1416", ["numeric"], {"tolerance": 1e-3})["passed"] is False
    assert score_case("1,234 items", 1234, ["numeric"])["passed"] is True
    assert score_case('Here: ```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}, ["json"])["passed"] is True
    assert score_case('{"a": 1', None, ["json"])["passed"] is False
    assert score_case('{"a": 1}', {"a": 2}, ["json"])["passed"] is False
    # ROUGE-L: LCS("the cat sat", "the cat ran") = 2 words, P = R = 2/3, F1 = 2/3
    rouge = score_case("the cat ran", "the cat sat", ["rouge"])
    assert rouge["scores"]["rouge"] == pytest.approx(2 / 3)
    assert rouge["passed"] is None  # a graded score never fails a case on its own
    assert score_case("x", "x", ["rouge"])["scores"]["rouge"] == 1.0


def test_aggregate_keeps_counts_and_means():
    cases = [score_case("Blue.", "blue", ["exact", "rouge"]), score_case("Red.", "blue", ["exact", "rouge"]),
             {"scores": {}, "passed": False, "error": "HTTP 500"}]
    summary = aggregate(cases)
    assert summary["cases"] == 3 and summary["errors"] == 1
    assert summary["pass_rate"] == pytest.approx(1 / 3)
    assert summary["metrics"] == {"exact": 0.5, "rouge": 0.5}


def test_percentiles_match_numpy_and_summary_follows_the_raw_timings():
    import numpy

    values = [0.3, 0.1, 0.25, 0.9, 0.4, 0.11, 0.7]
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))
    timings = [RequestTiming(0, "a", 0, start_s=1.0, end_s=2.0, ttft_s=0.2, output_tokens=5, itl_s=[0.2] * 4),
               RequestTiming(1, "a", 1, start_s=1.5, end_s=3.0, ttft_s=0.3, output_tokens=7, itl_s=[0.2] * 6),
               RequestTiming(2, "a", 2, start_s=1.6, end_s=1.7, error="HTTP 503")]
    s = summarise(timings)
    assert (s["requests"], s["successes"], s["errors"]) == (3, 2, 1)
    assert s["wall_s"] == pytest.approx(2.0)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_tokens_per_s"] == pytest.approx(6.0)
    assert s["tpot_s"]["p50"] == pytest.approx(((1.0 - 0.2) / 4 + (1.5 - 0.3) / 6) / 2)
    assert s["latency_s"]["p50"] <= s["latency_s"]["p95"] <= s["latency_s"]["p99"]


def test_cost_formulas_by_hand(tmp_path):
    table = cost.load_price_table()
    h100 = cost.instance_hourly(table, "h100-x1")
    # 1 × 3.00 GPU + 16 × 0.035 vCPU + 128 × 0.0045 GB RAM + 64 × 0.08 / 730 GB-month disk
    assert h100["gpu"] == pytest.approx(3.00)
    assert h100["cpu"] == pytest.approx(0.56)
    assert h100["ram"] == pytest.approx(0.576)
    assert h100["storage"] == pytest.approx(64 * 0.08 / 730)
    assert h100["total"] == pytest.approx(3.00 + 0.56 + 0.576 + 64 * 0.08 / 730)

    hourly = {"gpu": 3.0, "cpu": 0.4, "ram": 0.2, "storage": 0.0, "total": 3.6}
    assert cost.training_cost(hourly, 5400)["total"] == pytest.approx(5.4)  # 1.5 h × 3.6 $/h
    assert cost.training_cost(hourly, 5400)["gpu"] == pytest.approx(4.5)
    inference = cost.inference_cost(hourly, request_throughput=2.0, output_tokens_per_s=100.0)
    assert inference["per_request"]["total"] == pytest.approx(3.6 / 7200)  # $/h ÷ (3600 × req/s)
    assert inference["per_1m_output_tokens"]["total"] == pytest.approx(10.0)  # 3.6 / 360000 × 1e6
    assert inference["per_1m_output_tokens"]["gpu"] == pytest.approx(3.0 / 360000 * 1e6)

    own = tmp_path / "prices.toml"
    own.write_text('[rates]\ngpu_h100_hour = 2.0\n[instances.tiny]\nvcpus = 1\nram_gb = 2\n')
    table = cost.load_price_table(own, ["cpu_vcpu_hour=0.1", "instances.tiny.ram_gb=4"])
    assert cost.instance_hourly(table, "h100-x1")["gpu"] == 2.0
    assert cost.instance_hourly(table, "tiny")["total"] == pytest.approx(0.1 + 4 * 0.0045)
    with pytest.raises(cost.CostError, match="unknown instance"):
        cost.instance_hourly(table, "nope")
    with pytest.raises(cost.CostError, match="NAME=VALUE"):
        cost.load_price_table(None, ["oops"])


def test_training_duration_from_what_jarvis_train_prints(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "training.json").write_text('{"config": {}, "losses": [3.0, 2.0, 1.5]}')
    printed = tmp_path / "run.json"
    printed.write_text(f'some log line\n{{"output_dir": "{adapter}", "steps": 3, "seconds": 42.5}}\n')
    run = cost.read_training_run(printed)
    assert run["seconds"] == 42.5 and run["losses"] == [3.0, 2.0, 1.5]
    with pytest.raises(cost.CostError, match="--training-hours"):
        cost.read_training_run(adapter)
    assert not math.isnan(run["seconds"])
