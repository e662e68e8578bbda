"""What does a batch job buy? Lines/s of /v1/batches vs the same requests sent one at a time.

One run starts one `python -m jarvis serve` (embedded gemma-3-270m on llama.cpp, JARVIS_LLAMA_N_PARALLEL
contexts, JARVIS_BATCH_CONCURRENCY lines in flight) and sends the same N chat requests (greedy, same
max_tokens) two ways through the official `openai` client:

  sequential  one `chat.completions.create` after another, each waiting for the previous answer;
  batch       the N lines uploaded as one JSONL file, one batch created, polled every 0.1 s until it
              is completed (the time includes the upload, validation, finalizing and the polling).

Both paths hit the same server and engine in the same run; with `--rounds R` they alternate R times, so
background load hits both alike, and the ratio is the median over rounds. Every batch round must answer
every line once (checked). "lines/s" counts requests; "tok/s" counts completion tokens.

    python bench/batch_throughput.py [--requests N] [--max-tokens M] [--parallel P] [--concurrency C]
                                     [--rounds R] [--threads T] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402


def make_questions(n: int) -> list[str]:
    subjects = ["otters", "lighthouses", "volcanoes", "libraries", "comets", "bridges", "orchards"]
    asks = ["Describe", "List three facts about", "Write one sentence about", "Explain the history of"]
    return [f"Request {i}: {asks[i % len(asks)]} {subjects[(i * 3) % len(subjects)]}." for i in range(n)]


def chat_body(model: str, question: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}


def server_settings(parallel: int, concurrency: int, threads: int | None) -> dict[str, str]:
    settings = {"JARVIS_LLAMA_N_PARALLEL": str(parallel), "JARVIS_BATCH_CONCURRENCY": str(concurrency)}
    if threads:
        settings["JARVIS_LLAMA_N_THREADS"] = str(threads)
    return settings


def run_sequential(client: OpenAI, model: str, questions: list[str], max_tokens: int) -> dict:
    start = time.perf_counter()
    tokens = 0
    for question in questions:
        tokens += client.chat.completions.create(**chat_body(model, question, max_tokens)).usage.completion_tokens
    return {"seconds": time.perf_counter() - start, "completion_tokens": tokens}


def run_batch(client: OpenAI, model: str, questions: list[str], max_tokens: int, tag: str) -> dict:
    lines = [json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": chat_body(model, q, max_tokens)}) for i, q in enumerate(questions)]
    start = time.perf_counter()
    uploaded = client.files.create(file=(f"{tag}.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    seconds = time.perf_counter() - start
    if batch.status != "completed" or batch.request_counts.completed != len(questions):
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.request_counts}")
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    if sorted(r["custom_id"] for r in output) != sorted(f"{tag}-{i}" for i in range(len(questions))):
        raise RuntimeError("the batch output does not hold every custom_id exactly once")
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in output)
    return {"seconds": seconds, "completion_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4, help="JARVIS_LLAMA_N_PARALLEL (default 4)")
    parser.add_argument("--concurrency", type=int, help="JARVIS_BATCH_CONCURRENCY (default: --parallel)")
    parser.add_argument("--rounds", type=int, default=1, help="sequential/batch pairs, alternating")
    parser.add_argument("--threads", type=int, help="JARVIS_LLAMA_N_THREADS (default: the engine's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    concurrency = args.concurrency or args.parallel

    console = Console(width=max(Console().width, 100))
    questions = make_questions(args.requests)
    config = {"requests": args.requests, "max_tokens": args.max_tokens, "n_parallel": args.parallel,
              "batch_concurrency": concurrency, "rounds": args.rounds, "threads": args.threads,
              "cpu_count": os.cpu_count(), "load_before": os.getloadavg()[0]}
    rounds = []
    with console.status(f"{args.requests} requests x {args.rounds} round(s), sequential and as a batch ..."), \
            jarvis_server(**server_settings(args.parallel, concurrency, args.threads)) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        client.chat.completions.create(**chat_body(model, "Warm-up.", args.max_tokens))
        for r in range(args.rounds):
            order = ["sequential", "batch"] if r % 2 == 0 else ["batch", "sequential"]
            result = {}
            for path in order:
                result[path] = (run_sequential(client, model, questions, args.max_tokens) if path == "sequential"
                                else run_batch(client, model, questions, args.max_tokens, f"round{r}"))
            rounds.append(result)
    config["load_after"] = os.getloadavg()[0]

    table = Table(title=f"batch vs one-at-a-time: {args.requests} chat requests x {args.max_tokens} tokens, "
                        f"n_parallel={args.parallel}, concurrency={concurrency}")
    for column in ("round", "path", "seconds", "lines/s", "tok/s", "batch / sequential"):
        table.add_column(column, justify="right" if column not in ("path",) else "left")
    ratios = []
    for r, result in enumerate(rounds):
        for path in ("sequential", "batch"):
            m = result[path]
            m["lines_per_s"] = args.requests / m["seconds"]
            m["tokens_per_s"] = m["completion_tokens"] / m["seconds"]
        ratio = result["batch"]["lines_per_s"] / result["sequential"]["lines_per_s"]
        ratios.append(ratio)
        for path in ("sequential", "batch"):
            m = result[path]
            table.add_row(str(r + 1), path, f"{m['seconds']:.2f}", f"{m['lines_per_s']:.2f}",
                          f"{m['tokens_per_s']:.1f}", f"{ratio:.2f}x" if path == "batch" else "")
    console.print(table)
    summary = {"ratio_median": statistics.median(ratios), "ratios": ratios}
    console.print(f"batch throughput = [bold]{summary['ratio_median']:.2f}x[/] one-at-a-time (median over "
                  f"{len(ratios)} round(s)); load average {config['load_before']:.2f} -> {config['load_after']:.2f} "
                  f"on {config['cpu_count']} CPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "batch_throughput.json"
    out_json.write_text(json.dumps({"config": config, "summary": summary, "rounds": rounds}, indent=2))
    console.print(f"results: {out_json}")


if __name__ == "__main__":
    main()
