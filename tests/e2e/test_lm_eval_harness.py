"""lm-evaluation-harness against a real server, as people run it: `local-completions` with token-id prompts
(`tokenized_requests=True`) and the server's own tokenizer (`tokenizer_backend=remote`, vLLM's
/tokenizer_info, /tokenize, /detokenize), on local task files: a multiple-choice task, a generate_until
task and a loglikelihood_rolling task. The rolling log-likelihood must equal the server's own echo
scoring of the same text (one <bos>, every text token scored)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
MC = [{"question": "The capital of France is", "choices": [" Paris", " a banana", " blue"], "answer": 0},
      {"question": "Water freezes at zero degrees", "choices": [" Celsius", " tomorrow", " loudly"], "answer": 0},
      {"question": "One plus one equals", "choices": [" two", " purple", " Monday"], "answer": 0}]
GEN = [{"question": "Q: What is the capital of France?\nA:", "answer": "Paris"},
       {"question": "Q: What colour is the sky on a clear day?\nA:", "answer": "Blue"}]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."},
         {"text": "Water boils at one hundred degrees Celsius at sea level."}]


def write_tasks(folder: Path) -> None:
    for name, rows in (("mc", MC), ("gen", GEN), ("rolling", TEXTS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: train\n"
    (folder / "jarvis_mc.yaml").write_text(
        f"task: jarvis_mc\n{common}dataset_kwargs:\n  data_files: {{train: {folder / 'mc.jsonl'}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "jarvis_gen.yaml").write_text(
        f"task: jarvis_gen\n{common}dataset_kwargs:\n  data_files: {{train: {folder / 'gen.jsonl'}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n")
    (folder / "jarvis_rolling.yaml").write_text(
        f"task: jarvis_rolling\n{common}dataset_kwargs:\n  data_files: {{train: {folder / 'rolling.jsonl'}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")


@pytest.fixture(scope="module")
def harness_run(jarvis_server, tmp_path_factory):
    pytest.importorskip("lm_eval")
    server = jarvis_server(JARVIS_INFERENCE_ENGINE="llama_cpp", JARVIS_MAX_MODEL_LEN="2048")
    folder = tmp_path_factory.mktemp("lm_eval")
    write_tasks(folder)
    out = folder / "out"
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"model={MODEL},base_url={server.v1}/completions,tokenized_requests=True,tokenizer_backend=remote,"
            "num_concurrent=1,max_retries=1", "--tasks", "jarvis_mc,jarvis_gen,jarvis_rolling",
            "--include_path", str(folder), "--output_path", str(out), "--log_samples"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused",
                               "PATH": "/usr/bin:/bin", "HOME": str(folder)})
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {p.name.split("_", 2)[2].rsplit("_", 1)[0]: [json.loads(line) for line in p.read_text().splitlines()]
               for p in out.rglob("samples_*.jsonl")}
    return server, results, samples


def test_multiple_choice_and_generation_tasks_run(harness_run):
    _, results, _ = harness_run
    assert 0.0 <= results["results"]["jarvis_mc"]["acc,none"] <= 1.0
    assert results["results"]["jarvis_mc"]["acc,none"] >= 1 / 3  # better than chance on these easy facts
    assert 0.0 <= results["results"]["jarvis_gen"]["exact_match,none"] <= 1.0


def test_rolling_loglikelihood_equals_the_servers_own_scoring(harness_run):
    server, _, samples = harness_run
    (rolling,) = [rows for name, rows in samples.items() if "rolling" in name]
    for row in rolling:
        harness = float(row["resps"][0][0] if isinstance(row["resps"][0], list) else row["resps"][0])
        scored = httpx.post(f"{server.v1}/completions", timeout=60, json={
            "model": MODEL, "prompt": row["doc"]["text"], "max_tokens": 0, "echo": True, "logprobs": 0}).json()
        own = sum(lp for lp in scored["choices"][0]["logprobs"]["token_logprobs"] if lp is not None)
        assert harness == pytest.approx(own, abs=1e-3), (harness, own)
