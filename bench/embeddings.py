"""What does batching buy on /v1/embeddings? Embeddings/s for N short texts, batched vs one by one, per engine.

One run starts one `python -m jarvis serve` per engine (embedded gemma-3-270m: llama.cpp on the Q4_K_M GGUF,
transformers and vLLM on the converted float32 folder), warms it up (on vLLM the first request starts the
pooling engine; its start time and memory are printed from GET /v1/engine), then embeds the same N texts
three ways through the official `openai` client, one request after another:

  one request   all N texts in one request;
  batches       requests of --batch texts each;
  one by one    N requests of one text each.

With `--rounds R` the three alternate R times on the same server, so background load hits them alike; the
figure is the median over rounds. Every answer is checked (N vectors of unit length). The last column is
one request's speed over one by one's.

    python bench/embeddings.py [--engines llama_cpp,hf,vllm] [--texts N] [--batch B] [--rounds R] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"
ENGINE_SETTINGS = {
    "llama_cpp": {"JARVIS_INFERENCE_ENGINE": "llama_cpp"},
    "hf": {"JARVIS_INFERENCE_ENGINE": "hf"},
    "vllm": {"JARVIS_INFERENCE_ENGINE": "vllm", "JARVIS_VLLM_CPU_KVCACHE_SPACE": "1"},
}


def make_texts(n: int) -> list[str]:
    subjects = ["otters", "lighthouses", "volcanoes", "libraries", "comets", "bridges", "orchards", "glaciers"]
    verbs = ["are studied by", "inspire", "were painted by", "puzzle", "are loved by"]
    people = ["children", "sailors", "old painters", "astronomers", "farmers", "poets"]
    return [f"Note {i}: {subjects[i % 8]} {verbs[(i // 8) % 5]} {people[(i // 40) % 6]}." for i in range(n)]


def embed(client: OpenAI, texts: list[str], per_request: int) -> float:
    """Seconds to embed `texts` in requests of `per_request` texts, one after another (answers checked)."""
    start = time.perf_counter()
    vectors: list[list[float]] = []
    for i in range(0, len(texts), per_request):
        answer = client.embeddings.create(model=MODEL, input=texts[i:i + per_request], encoding_format="float")
        vectors.extend(d.embedding for d in answer.data)
    seconds = time.perf_counter() - start
    assert len(vectors) == len(texts)
    assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)
    return seconds


def bench_engine(engine: str, texts: list[str], batch: int, rounds: int) -> dict:
    with jarvis_server(ready_timeout_s=900, JARVIS_MAX_MODEL_LEN="512", **ENGINE_SETTINGS[engine]) as v1:
        client = OpenAI(base_url=v1, api_key="unused", max_retries=0, timeout=1800)
        began = time.perf_counter()
        client.embeddings.create(model=MODEL, input=texts[:4])  # warm up (vLLM: starts the pooling engine)
        first = time.perf_counter() - began
        described = httpx.get(f"{v1}/engine", timeout=30).json().get("embeddings", {})
        ways = {"one request": len(texts), f"batches of {batch}": batch, "one by one": 1}
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, per_request in ways.items():
                seconds[way].append(embed(client, texts, per_request))
        return {"engine": engine, "first_request_s": first, "embeddings": described,
                "per_second": {way: len(texts) / statistics.median(s) for way, s in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="llama_cpp,hf,vllm")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    texts = make_texts(args.texts)
    console = Console()
    results = []
    for engine in args.engines.split(","):
        console.print(f"[bold]{engine}[/bold]: starting, {args.texts} texts x {args.rounds} round(s)...")
        results.append(bench_engine(engine, texts, args.batch, args.rounds))
        start = results[-1]["embeddings"].get("start")
        if start:
            console.print(f"  vLLM pooling engine: started in {start['start_s']} s, process tree RSS "
                          f"{start['rss_before_mib']} -> {start['rss_after_mib']} MiB, new processes' USS "
                          f"{start['new_processes_uss_mib']} MiB")
    ways = list(results[0]["per_second"])
    table = Table(title=f"/v1/embeddings: embeddings/s for {args.texts} short texts (median of {args.rounds})")
    table.add_column("engine")
    for way in ways:
        table.add_column(way, justify="right")
    table.add_column("one request / one by one", justify="right")
    for r in results:
        rates = r["per_second"]
        table.add_row(r["engine"], *(f"{rates[w]:.1f}" for w in ways), f"{rates[ways[0]] / rates[ways[-1]]:.1f}x")
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
