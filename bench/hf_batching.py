"""How much the transformers engine's batching buys: tokens/s at 1, 4, 8, 16 concurrent requests.

In one run, on one model, it measures
  * plain `model.generate` for one prompt at a time (what a naive server does),
  * Jarvis's `BatchScheduler` one request at a time (its per-step overhead alone),
  * the scheduler with C requests in flight together, for each C in --concurrency,
and prints tokens/s per path, the speed-up of C-concurrent over one-at-a-time,
and forward passes per generated token (1.0 means no batching at all).

Every request generates exactly --max-tokens tokens (end-of-sequence is ignored),
so paths compare equal work. `--random-weights` builds a Gemma-3-270M-shaped
model from bench/gemma3_270m_config.json (what fits on a machine without the
model files, e.g. a GPU host); without it the embedded model's converted folder
is used.

    python bench/hf_batching.py --device cuda --dtype bf16 --random-weights
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from jarvis.backends.hf.attention import grouped_sdpa
from jarvis.backends.hf.waves import BatchScheduler, ModelHandle
from jarvis.engine import EngineStats, PreparedRequest

HERE = Path(__file__).parent


def load_model(args: argparse.Namespace, attention: str | None = None):
    """The model, with the engine's attention (grouped decode sdpa) unless `attention` names another."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.random_weights:
        config = AutoConfig.from_pretrained(HERE / "gemma3_270m_config.json")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention or grouped_sdpa())
    else:
        from jarvis.backends.model_tools.convert import embedded_hf_model
        from jarvis.settings import load_settings

        model = AutoModelForCausalLM.from_pretrained(embedded_hf_model(load_settings().data_dir), dtype=dtype,
                                                     attn_implementation=attention or grouped_sdpa())
    return model.to(args.device).eval()


class NoTokenizer:
    """The scheduler decodes text for its clients; with random token ids a placeholder does."""

    pad_token_id = 0
    bos_token_id = 2

    def decode(self, ids, skip_special_tokens=False):
        return "x" * len(ids)


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [[2, *torch.randint(100, vocab, (length - 1,), generator=g).tolist()] for _ in range(n)]


def run_scheduler(scheduler: BatchScheduler, batch: list[list[int]], max_tokens: int) -> int:
    """Submit `batch` at once; return the tokens generated once all are done."""
    done, counts, lock = threading.Event(), [], threading.Lock()

    def emit(chunk):
        if isinstance(chunk, BaseException):
            raise chunk
        if chunk.finish_reason:
            with lock:
                counts.append(chunk.completion_tokens)
                if len(counts) == len(batch):
                    done.set()

    for ids in batch:
        req = PreparedRequest(prompt=None, model="bench", max_tokens=max_tokens, temperature=0.0)
        scheduler.submit(req, ids, emit, threading.Event())
    done.wait()
    return sum(counts)


def timed(fn, sync) -> tuple[float, int]:
    sync()
    start = time.perf_counter()
    tokens = fn()
    sync()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode", default=None, help="dynamic | static | graphs (default: graphs on CUDA)")
    parser.add_argument("--out", default=str(HERE / "results" / "hf_batching.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    model = load_model(args)
    stats = EngineStats()
    handle = ModelHandle(model, NoTokenizer(), torch.device(args.device), frozenset(), threading.Lock(), stats)
    decode = args.decode or ("graphs" if args.device.startswith("cuda") else "dynamic")
    scheduler = BatchScheduler(handle, max_batch_size=max(levels), gather_seconds=0.005, decode=decode,
                               max_len=args.prompt_len + args.max_tokens + 8)
    scheduler.start()
    data = prompts(max(levels), args.prompt_len, model.config.vocab_size)
    for c in levels:  # warm-up at full length: in "graphs" mode this is where the decode step compiles
        run_scheduler(scheduler, data[:c], args.max_tokens)

    rows = []
    with torch.inference_mode():
        model.generate(torch.tensor([data[0]], device=args.device), max_new_tokens=4, do_sample=False)

        def plain(n: int) -> int:
            for ids in data[:n]:
                model.generate(torch.tensor([ids], device=args.device), max_new_tokens=args.max_tokens,
                               min_new_tokens=args.max_tokens, do_sample=False)
            return n * args.max_tokens

        n_seq = min(4, max(levels))
        seconds, tokens = timed(lambda: plain(n_seq), sync)
        rows.append({"path": "plain generate, one at a time", "concurrency": 1, "tokens_per_s": tokens / seconds,
                     "passes_per_token": None})
        before = stats.forward_passes
        seconds, tokens = timed(lambda: sum(run_scheduler(scheduler, [ids], args.max_tokens)
                                            for ids in data[:n_seq]), sync)
        single = tokens / seconds
        rows.append({"path": "jarvis scheduler, one at a time", "concurrency": 1, "tokens_per_s": single,
                     "passes_per_token": (stats.forward_passes - before) / tokens})
        for c in levels:
            before = stats.forward_passes
            seconds, tokens = timed(lambda c=c: run_scheduler(scheduler, data[:c], args.max_tokens), sync)
            rows.append({"path": "jarvis scheduler, concurrent", "concurrency": c, "tokens_per_s": tokens / seconds,
                         "passes_per_token": (stats.forward_passes - before) / tokens})
    scheduler.stop()

    plain_rate = rows[0]["tokens_per_s"]
    print(f"\nmodel: {'random-weight ' if args.random_weights else ''}Gemma-3-270M, {args.dtype} on {args.device}"
          f" ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"{args.max_tokens} new tokens, {args.prompt_len}-token prompts, decode={decode}")
    print(f"{'path':34} {'C':>3} {'tokens/s':>10} {'vs 1-at-a-time':>15} {'vs generate':>12} {'passes/token':>13}")
    for row in rows:
        row["speedup_vs_one_at_a_time"] = row["tokens_per_s"] / single
        row["speedup_vs_plain_generate"] = row["tokens_per_s"] / plain_rate
        ppt = f"{row['passes_per_token']:.3f}" if row["passes_per_token"] is not None else "-"
        print(f"{row['path']:34} {row['concurrency']:>3} {row['tokens_per_s']:>10.1f} "
              f"{row['speedup_vs_one_at_a_time']:>14.2f}x {row['speedup_vs_plain_generate']:>11.2f}x {ppt:>13}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
