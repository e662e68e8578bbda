"""What does Jarvis cost on top of llama.cpp? Per-request overhead of the server vs the raw engine.

One run measures three paths side by side on the same prompts with identical settings
(embedded gemma-3-270m, greedy / temperature 0, same max_tokens, n_threads, n_ctx and n_batch):

  raw     llama-cpp-python in this process: a `Llama.generate` loop doing exactly what Jarvis's engine
          does (tokenize with special=True, same sampling arguments, stop at an end-of-generation
          token or max_tokens, detokenize with special=True). Not `create_completion`: it adds its own
          per-token work (incremental detokenizing, stop and logprob bookkeeping) that would hide part
          of Jarvis's overhead inside the baseline. Completion tokens are counted exactly.
  jarvis  `python -m jarvis serve` in a subprocess (127.0.0.1, JARVIS_LLAMA_N_PARALLEL=1) through the
          official `openai` client, /v1/completions, non-streaming;
  stream  the same on a second server, streaming (TTFT = time to the first chunk that carries text).

Each path has its own llama.cpp context and sees the same prompts in the same order, so prompt-prefix
caching helps every path alike (and greedy texts stay comparable: a context that re-uses a cached
prefix computes slightly different floats than one that evaluates it afresh).

Each path gets a warm-up request first; requests are sequential, so this measures per-request
overhead (HTTP, JSON, asyncio hand-offs, text decoding), not batching. For each prompt the three
paths run back to back, in an order that rotates from prompt to prompt, so a burst of background
load hits all three alike instead of skewing one path's whole run.

How to read it: "added ms" = jarvis latency - raw latency for the same prompt (paired), p50 / p95;
"tok/s vs raw" = jarvis / raw completion tokens per second (1.000 = no cost); "texts match" counts
prompts whose greedy completion equals raw's (every mismatch is printed). Background load still
shows up as noise in the paired differences (the load average is printed).

    python bench/proxy_overhead.py [--requests N] [--max-tokens M] [--threads T] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from openai import OpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

N_CTX = 4096  # Jarvis's default JARVIS_MAX_MODEL_LEN
N_BATCH = 512  # Jarvis's default JARVIS_LLAMA_N_BATCH
WARMUP_PROMPT = "Warm-up: the quick brown fox"


@dataclass
class Sample:
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    text: str
    ttft_s: float | None = None


def make_prompts(n: int) -> list[str]:
    """n distinct prompts, from one line to ~300 tokens of context, always the same."""
    animals = ["otter", "heron", "lynx", "badger", "gecko", "walrus", "falcon"]
    places = ["a river delta", "an old library", "a pine forest", "a harbor town", "a desert canyon"]
    questions = ["Describe where the animals live.", "Which animal is the most unusual?",
                 "Write a short story about them.", "Summarize the notes above.", "What happens next?"]
    prompts = []
    for i in range(n):
        facts = [f"Note {j}: the {animals[(i + j) % len(animals)]} was seen near {places[(i * j) % len(places)]}."
                 for j in range((i * 7) % 23)]
        prompts.append("\n".join([*facts, f"Question {i}: {questions[i % len(questions)]}", "Answer:"]))
    return prompts


@contextmanager
def raw_engine(model_path: Path, max_tokens: int, threads: int) -> Iterator[Callable[[str], Sample]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(model_path), n_ctx=N_CTX, n_batch=N_BATCH, n_threads=threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def complete(prompt: str) -> Sample:
        start = time.perf_counter()
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        tokens: list[int] = []
        ttft = None
        for token in llm.generate(ids, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0,
                                  repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            ttft = ttft if ttft is not None else time.perf_counter() - start
            tokens.append(token)
            if len(tokens) >= max_tokens:
                break
        text = llm.detokenize(tokens, special=True).decode(errors="replace")
        return Sample(time.perf_counter() - start, len(ids), len(tokens), text, ttft)

    try:
        yield complete
    finally:
        llm.close()


def run_interleaved(paths: dict[str, Callable[[str], Sample]], prompts: list[str]) -> dict[str, list[Sample]]:
    """Every prompt through every path back to back; the order rotates so no path always goes first."""
    for complete in paths.values():
        complete(WARMUP_PROMPT)
    names = list(paths)
    runs: dict[str, list[Sample]] = {name: [] for name in names}
    for i, prompt in enumerate(prompts):
        for name in names[i % len(names):] + names[: i % len(names)]:
            runs[name].append(paths[name](prompt))
    return runs


def llama_settings(data_dir: Path, threads: int, **extra: str) -> dict[str, str]:
    """The server settings that mirror the raw engine's (one context, same threads, batch and context)."""
    return {"JARVIS_DATA_DIR": str(data_dir), "JARVIS_LLAMA_N_PARALLEL": "1", "JARVIS_LLAMA_N_THREADS": str(threads),
            "JARVIS_LLAMA_N_BATCH": str(N_BATCH), "JARVIS_MAX_MODEL_LEN": str(N_CTX), **extra}


def jarvis_client(client: OpenAI, model: str, max_tokens: int, stream: bool) -> Callable[[str], Sample]:
    def complete(prompt: str) -> Sample:
        start = time.perf_counter()
        response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        usage = response.usage
        return Sample(time.perf_counter() - start, usage.prompt_tokens, usage.completion_tokens,
                      response.choices[0].text)

    def complete_streaming(prompt: str) -> Sample:
        start = time.perf_counter()
        ttft, parts, usage = None, [], None
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                parts.append(chunk.choices[0].text)
            usage = chunk.usage or usage
        latency = time.perf_counter() - start
        return Sample(latency, usage.prompt_tokens, usage.completion_tokens, "".join(parts), ttft)

    return complete_streaming if stream else complete


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def summarize(samples: list[Sample], baseline: list[Sample], baseline_name: str = "raw") -> dict:
    """One path's figures, paired prompt by prompt with the baseline path's samples."""
    total_s = sum(s.latency_s for s in samples)
    tokens = sum(s.completion_tokens for s in samples)
    ttfts = [s.ttft_s for s in samples if s.ttft_s is not None]
    added = [s.latency_s - b.latency_s for s, b in zip(samples, baseline)]
    baseline_tps = sum(b.completion_tokens for b in baseline) / sum(b.latency_s for b in baseline)
    return {"latency_p50_ms": ms([s.latency_s for s in samples], 50),
            "latency_p95_ms": ms([s.latency_s for s in samples], 95),
            "completion_tokens": tokens, "total_s": round(total_s, 3),
            "tokens_per_s": round(tokens / total_s, 1),
            "ttft_p50_ms": ms(ttfts, 50) if ttfts else None,
            "added_p50_ms": ms(added, 50), "added_p95_ms": ms(added, 95),
            f"tokens_per_s_vs_{baseline_name}": round(tokens / total_s / baseline_tps, 3),
            "texts_match": sum(s.text == b.text for s, b in zip(samples, baseline))}


def print_report(console: Console, summary: dict[str, dict], runs: dict[str, list[Sample]], config: dict) -> None:
    n = config["requests"]
    table = Table(title=f"Jarvis vs raw llama.cpp — {n} sequential requests, max_tokens={config['max_tokens']}, "
                        f"n_threads={config['threads']}, greedy")
    for column in ["path", "p50 ms", "p95 ms", "tok/s", "TTFT p50 ms", "added p50 ms", "added p95 ms",
                   "tok/s vs raw", "texts match"]:
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, s in summary.items():
        raw = name == "raw"
        table.add_row(name, f"{s['latency_p50_ms']:.1f}", f"{s['latency_p95_ms']:.1f}", f"{s['tokens_per_s']:.1f}",
                      "—" if s["ttft_p50_ms"] is None else f"{s['ttft_p50_ms']:.1f}",
                      "—" if raw else f"{s['added_p50_ms']:+.1f}", "—" if raw else f"{s['added_p95_ms']:+.1f}",
                      "—" if raw else f"{s['tokens_per_s_vs_raw']:.3f}", "—" if raw else f"{s['texts_match']}/{n}")
    console.print(table)
    console.print(f"load average (1 min) before/after: {config['load_before']:.2f} / {config['load_after']:.2f} "
                  f"on {config['cpu_count']} cores — well above n_threads means the numbers are noisy.")
    console.print("TTFT for raw = time to the first generated token in-process; for stream = first text chunk.")
    for name in ("jarvis", "stream"):
        for i, (s, r) in enumerate(zip(runs[name], runs["raw"])):
            if s.prompt_tokens != r.prompt_tokens:
                console.print(f"[red]{name}: prompt {i} is {s.prompt_tokens} tokens, raw {r.prompt_tokens}[/red]")
            if s.text != r.text:
                console.print(f"[red]{name}: prompt {i} differs[/red]\n  raw:    {r.text!r}\n  {name}: {s.text!r}")


def save_plot(runs: dict[str, list[Sample]], path: Path, console: Console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib is not installed: skipping the plot.")
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, samples in runs.items():
        ax.plot([s.latency_s * 1000 for s in samples], marker="o", label=name)
    ax.set_xticks(range(len(runs["raw"])))
    ax.set(xlabel="prompt #", ylabel="latency (ms)", title="Per-request latency, same prompt per x (paired)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="distinct prompts (default 20)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // 2, 1),
                        help="n_threads for both paths (default: half the cores, llama-cpp-python's default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from jarvis.embedded_model import embedded_model_path
    from jarvis.settings import load_settings

    console = Console(width=max(Console().width, 120))  # room for the table when piped
    data_dir = load_settings().data_dir
    model_path = embedded_model_path(data_dir)
    prompts = make_prompts(args.requests)
    config = {"requests": args.requests, "max_tokens": args.max_tokens, "threads": args.threads,
              "n_ctx": N_CTX, "n_batch": N_BATCH, "model": str(model_path), "cpu_count": os.cpu_count(),
              "load_before": os.getloadavg()[0]}

    with console.status(f"{len(prompts)} prompts through raw llama.cpp, Jarvis and Jarvis streaming ..."), \
            raw_engine(model_path, args.max_tokens, args.threads) as raw, \
            jarvis_server(**llama_settings(data_dir, args.threads)) as plain_url, \
            jarvis_server(**llama_settings(data_dir, args.threads)) as stream_url:
        plain, streaming = (OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
                            for url in (plain_url, stream_url))
        model = plain.models.list().data[0].id
        runs = run_interleaved({"raw": raw,
                                "jarvis": jarvis_client(plain, model, args.max_tokens, stream=False),
                                "stream": jarvis_client(streaming, model, args.max_tokens, stream=True)}, prompts)

    config["load_after"] = os.getloadavg()[0]
    summary = {name: summarize(samples, runs["raw"]) for name, samples in runs.items()}
    print_report(console, summary, runs, config)
    args.out.mkdir(parents=True, exist_ok=True)
    per_request = [{"prompt": p, **{name: asdict(runs[name][i]) for name in runs}} for i, p in enumerate(prompts)]
    out_json = args.out / "proxy_overhead.json"
    out_json.write_text(json.dumps({"config": config, "summary": summary, "requests": per_request}, indent=2))
    console.print(f"results: {out_json}")
    save_plot(runs, args.out / "proxy_overhead.png", console)


if __name__ == "__main__":
    main()
