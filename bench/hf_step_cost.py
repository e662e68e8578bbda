"""Where the transformers engine's wave scheduler spends its time: the decode step by rows × context, the joins.

In one process, on one model (the embedded model's converted folder, or --random-weights: Gemma-3-270M's shape),
with Jarvis's `BatchScheduler` itself (no HTTP), it measures

  steps    for each --windows mode (whole: every step attends all LEN slots of the static cache; windowed:
           the engine's default, the smallest power-of-two window that holds the slots in use) and each
           ROWSxLEN of --grid, a scheduler with max_batch_size=ROWS and max_len=LEN decodes one
           request, then ROWS requests at once (--prompt-len tokens in, --max-tokens out, end-of-sequence
           ignored): ms per step in the forward pass (synchronized) and in the rest (sampling, each row's
           bookkeeping, the wave's prefill spread over its steps), and tokens/s;
  loop     closed loops of C clients (--loop-concurrency, each sends its next request 0-5 ms after its last
           one ended) on the first grid entry's scheduler of each mode: tokens/s, TTFT p50, how many requests
           joined a running wave, ms per join (its prefill and the copy into the wave's rows), and the wall's
           share spent in joins; with --join-wait-ms, also with the engine's JARVIS_HF_JOIN_WAIT_MS at each of
           those values (arrivals held until the oldest has waited that long or they are as many as the decoding rows);
  kernels  torch.profiler over one join-sized prefill (batch 1) and one decode step: kernels launched (ops on
           CPU), device-busy ms and host ms each; the prefill eager, and as a join runs it with "graphs" (the
           engine's PrefillGraphs: a replayed CUDA graph); with --prefill-variants also compiled by inductor
           (fused kernels, dynamic length).

A static wave ("graphs" on CUDA, "static" elsewhere) keeps ROWS rows of LEN slots whatever its load and attends
only the window in use; a "graphs" step computes all ROWS rows (one shape, which the compiler specialises), an
eager "static" one only its first rows, the smallest power of two from MIN_ROWS that holds the busy ones
(--first-rows / --no-first-rows choose); `row_steps` counts the steps by the rows they computed. So the step's
cost at one request shows what is left of the preallocated shape.

    python bench/hf_step_cost.py --random-weights --grid 64x2048 --loop-concurrency 16,64 --join-wait-ms 0,10
    python bench/hf_step_cost.py --device cpu --random-weights --grid 4x256 --attention grouped --prompt-len 32 \
        --max-tokens 16 --loop-concurrency 3 --join-wait-ms 0,50   # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from hf_batching import HERE, NoTokenizer, load_model, prompts, run_scheduler

from jarvis.backends.hf.step_graphs import PrefillGraphs
from jarvis.backends.hf.waves import MIN_WINDOW, BatchScheduler, ModelHandle
from jarvis.engine import EngineStats, PreparedRequest


class TimedScheduler(BatchScheduler):
    """The engine's scheduler with its forward steps and joins timed (each synchronized, so the times are the
    device's too)."""

    def __init__(self, *args: Any, sync: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync = sync
        self.t: collections.Counter[str] = collections.Counter()

    def _timed(self, name: str, call: Any, *args: Any) -> Any:
        """`call(*args)` synchronized before and after: its seconds added to t[name_s], counted in t[names]."""
        self.sync()
        start = time.perf_counter()
        out = call(*args)
        self.sync()
        self.t[f"{name}_s"] += time.perf_counter() - start
        self.t[f"{name}s"] += 1
        return out

    def _step(self, *args: Any) -> Any:
        if self.overlap:  # a synchronized step would undo the overlap: only the steps are counted
            self.t["steps"] += 1
            return super()._step(*args)
        return self._timed("step", super()._step, *args)

    def _prefill(self, *args: Any) -> Any:
        return self._timed("prefill", super()._prefill, *args)

    def _join(self, w: Any) -> None:
        before = self.joined
        self.sync()
        start = time.perf_counter()
        super()._join(w)
        self.sync()
        if self.joined > before:
            self.t["join_s"] += time.perf_counter() - start
            self.t["joins"] += 1
            self.t["joined"] += self.joined - before


def scheduler_for(model: Any, rows: int, length: int, window: str, args: argparse.Namespace,
                  sync: Any) -> TimedScheduler:
    handle = ModelHandle(model, NoTokenizer(), torch.device(args.device), frozenset(), threading.RLock(), EngineStats())
    s = TimedScheduler(handle, max_batch_size=rows, gather_seconds=0.005, decode=args.decode, max_len=length,
                       min_window=length if window == "whole" else MIN_WINDOW, sync=sync, first_rows=args.first_rows,
                       overlap=args.overlap, prefill_graphs=args.prefill_graphs,
                       prefill_shapes=Path(args.prefill_shapes) if args.prefill_shapes else None)
    s.start()
    if args.prefill_shapes:  # as the engine's start: the shapes an earlier run kept, captured now
        started = time.perf_counter()
        kept = s.warm_prefills()
        print(f"captured {kept} prefill shapes kept in {args.prefill_shapes} in {time.perf_counter() - started:.2f} s")
    return s


def per_step(s: TimedScheduler, batch: list[list[int]], max_tokens: int) -> dict[str, float]:
    s.t.clear()
    s.row_steps.clear()
    start = time.perf_counter()
    tokens = run_scheduler(s, batch, max_tokens)
    wall = time.perf_counter() - start
    steps = max(1, s.t["steps"])
    return {"requests": len(batch), "tokens": tokens, "tok_s": tokens / wall, "steps": s.t["steps"],
            "forward_ms": 1e3 * s.t["step_s"] / steps, "rest_ms": 1e3 * (wall - s.t["step_s"]) / steps,
            "row_steps": dict(sorted(s.row_steps.items()))}


def quantile(values: list[float], q: float) -> float:
    """The value at quantile `q` of `values` (the nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def closed_loop(s: TimedScheduler, data: list[list[int]], clients: int, total: int, max_tokens: int,
                jitter: float) -> dict[str, Any]:
    """`clients` threads, each sending its next request a random 0-`jitter` s after its last one finished (what
    an HTTP round trip spreads), `total` in all."""
    rng = random.Random(0)
    ttfts: list[float] = []
    tokens = [0]
    lock, left = threading.Lock(), [total]

    def client(k: int) -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
                n = left[0]
            done, first = threading.Event(), []
            time.sleep(rng.uniform(0, jitter))
            sent = time.perf_counter()

            def emit(chunk: Any, done: threading.Event = done, first: list[float] = first, sent: float = sent) -> None:
                if isinstance(chunk, BaseException):
                    raise chunk
                if chunk.token_count and not first:
                    first.append(time.perf_counter() - sent)
                if chunk.finish_reason:
                    with lock:
                        tokens[0] += chunk.completion_tokens
                        ttfts.extend(first)
                    done.set()
            req = PreparedRequest(prompt=None, model="bench", max_tokens=max_tokens, temperature=0.0,
                                  ignore_eos=True)
            s.submit(req, data[n % len(data)], emit, threading.Event())
            done.wait()

    s.t.clear()
    joined, captured, start = s.joined, s.prefill_captures, time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": total, "tok_s": tokens[0] / wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttfts), "ttft_p99_ms": 1e3 * quantile(ttfts, 0.99),
            "ttft_max_ms": 1e3 * max(ttfts),
            "joined": s.joined - joined, "joins": s.t["joins"], "join_ms": 1e3 * s.t["join_s"] / max(1, s.t["joins"]),
            "prefill_ms": 1e3 * s.t["prefill_s"] / max(1, s.t["prefills"]),
            "prefill_captures": s.prefill_captures - captured,
            "join_share": s.t["join_s"] / wall, "forward_ms": 1e3 * s.t["step_s"] / max(1, s.t["steps"]),
            "forward_share": s.t["step_s"] / wall}


def kernels(model: Any, s: TimedScheduler, prompt: list[int], args: argparse.Namespace, sync: Any) -> dict[str, Any]:
    """Kernels (ops on CPU), device-busy ms and host ms of one eager batch-1 prefill and of one decode step."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def measured(fn: Any) -> dict[str, float]:
        for _ in range(3):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        sync()
        host_ms = 1e3 * (time.perf_counter() - start) / 5
        with profile(activities=activities) as prof:
            fn()
            sync()
        events = prof.events()
        if cuda:
            device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time for e in device) / 1e3
        else:
            device = [e for e in events if e.name.startswith("aten::") and not e.cpu_parent]
            busy = 0.0
        return {"kernels": len(device), "device_busy_ms": busy, "wall_ms": host_ms}

    ids = torch.tensor([prompt], device=args.device)

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    out = {"prefill_batch1": measured(prefill)}
    # what a join's prefill could cost instead: compiled by inductor (kernels fused, no CUDA graph, one dynamic
    # length), and replayed as a CUDA graph into a static cache of the prompt's length
    fused = torch.compile(model.forward, dynamic=True)
    for n in (len(prompt), len(prompt) * 3 // 4) if args.prefill_variants else ():
        part = ids[:, :n]

        def prefill_fused(part: torch.Tensor = part) -> None:
            with torch.inference_mode():
                fused(input_ids=part, past_key_values=DynamicCache(config=model.config), use_cache=True,
                      logits_to_keep=1)
        try:
            started = time.perf_counter()
            prefill_fused()
            out[f"prefill_batch1_inductor_len{n}"] = {"first_call_s": time.perf_counter() - started,
                                                      **measured(prefill_fused)}
        except Exception as exc:  # a measurement, not a requirement: say why it did not run
            out[f"prefill_batch1_inductor_len{n}"] = {"error": repr(exc)[:300]}
    # what a join's prefill runs with "graphs": the engine's PrefillGraphs (on a CPU the same forward, uncaptured)
    graphs = PrefillGraphs(model.forward, model.config, next(model.parameters()).dtype)
    mask = torch.ones_like(ids)
    positions = torch.arange(len(prompt), device=args.device)[None]

    def prefill_graph() -> None:
        with torch.inference_mode():
            graphs.prefill(ids, mask, positions)
    started = time.perf_counter()
    prefill_graph()
    out["prefill_batch1_graph"] = {"first_call_s": time.perf_counter() - started, "captured": graphs.captures,
                                   **measured(prefill_graph)}
    # a decode step: the difference between a wave of 10 tokens and one of 2, per step
    short, long = (measured(lambda n=n: run_scheduler(s, [prompt], n)) for n in (2, 10))
    out["decode_step"] = {k: (long[k] - short[k]) / 8 for k in long}
    return out


def spawn_each(args: argparse.Namespace, combos: list[tuple[str, str, tuple[int, ...]]],
               grid: list[tuple[int, ...]]) -> None:
    """Measure each (attention, window, grid entry) in a process of its own and merge the results: each starts
    from a fresh CUDA memory pool and compiler cache, as a server does."""
    merged: dict[str, Any] = {"args": vars(args), "steps": [], "loop": [], "kernels": None}
    for i, (attention, window, (rows, length)) in enumerate(combos):
        out = Path(args.out).with_suffix(f".{i}.json")
        command = [sys.executable, __file__, *sys.argv[1:], "--child", "--attention", attention, "--windows", window,
                   "--grid", f"{rows}x{length}", "--out", str(out)]
        if (rows, length) != grid[0]:
            command += ["--loop-concurrency", "0"]
        if i != len(combos) - 1:
            command += ["--no-kernels"]
        subprocess.run(command, check=False)
        if out.is_file():
            part = json.loads(out.read_text())
            merged["steps"] += part["steps"]
            merged["loop"] += part["loop"]
            merged["kernels"] = part["kernels"] or merged["kernels"]
            out.unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(merged, indent=2))
    print(f"\nwrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--decode", default=None, help="static | graphs (default: graphs on CUDA, static elsewhere)")
    parser.add_argument("--grid", default="64x2048,64x512,16x2048,16x512", help="ROWSxLEN,... (max_batch_size × "
                        "max_len of the static cache)")
    parser.add_argument("--windows", default="whole,windowed", help="whole: every step attends all LEN slots "
                        "(min_window=LEN); windowed: the engine's default windows")
    parser.add_argument("--prefill-variants", action="store_true", help="also time the prefill compiled by inductor "
                        "(dynamic length; its compile took minutes on an H100 host)")
    parser.add_argument("--attention", default="grouped,sdpa", help="grouped: the engine's grouped decode attention "
                        "(backends/hf/attention.py); sdpa: transformers' own")
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="profile the prefill and one decode step at the end")
    parser.add_argument("--first-rows", action=argparse.BooleanOptionalAction, default=None,
                        help="steps compute only the first rows that hold the busy ones (default: the engine's, on "
                             "for eager static, off for graphs, where the compiler then specialises the batch)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="launch each static step before the last one's tokens are taken (default: with "
                             "graphs); the forward ms are then not measured (a synchronized step would undo it)")
    parser.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each prompts' forward pass (a wave's start, a join) as a CUDA graph of its "
                             "padded shape (default: with graphs)")
    parser.add_argument("--prefill-shapes", metavar="FILE", help="the schedulers keep their prefill graphs' shapes "
                        "in FILE, and capture the shapes it holds at their start, as the engine does with its state "
                        "dir's (run twice: the second run's loops capture none)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--loop-concurrency", default="16,64", help="clients of each closed loop; 0: none")
    parser.add_argument("--join-wait-ms", default="0", help="closed loops with these join waits (an experiment: "
                        "a waiting request joins once the oldest has waited this long, so one prefill admits several)")
    parser.add_argument("--loop-jitter-ms", type=float, default=5.0)
    parser.add_argument("--loop-requests", type=int, default=0, help="default: 8 × the concurrency")
    parser.add_argument("--out", default=str(HERE / "results" / "hf_step_cost.json"))
    args = parser.parse_args()
    args.decode = args.decode or ("graphs" if args.device.startswith("cuda") else "static")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    grid = [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]

    attentions, windows = args.attention.split(","), args.windows.split(",")
    combos = [(a, w, g) for a in attentions for w in windows for g in grid]
    if args.decode == "graphs" and len(combos) > 1 and not args.child:
        return spawn_each(args, combos, grid)

    torch._dynamo.config.cache_size_limit = 64  # a scheduler per grid entry: each compiles the step again
    results: dict[str, Any] = {"args": vars(args), "steps": [], "loop": [], "kernels": None}
    print(f"{'attention':>9} {'window':>8} {'rows x len':>12} {'requests':>8} {'tok/s':>9} {'forward ms':>10} "
          f"{'rest ms':>8} {'warm-up s':>9}")
    for attention in attentions:
        model = load_model(args, attention=None if attention == "grouped" else attention)
        data = prompts(max(64, max(r for r, _ in grid)), args.prompt_len, model.config.vocab_size)
        made: list[TimedScheduler] = []
        for window in windows:
            for rows, length in grid:
                s = scheduler_for(model, rows, length, window, args, sync)
                made.append(s)
                started = time.perf_counter()
                run_scheduler(s, data[:1], 4)  # warm-up: in "graphs" mode the step compiles here
                run_scheduler(s, data[:rows], 4)
                warm = time.perf_counter() - started
                for batch in (data[:1], data[:rows]):
                    r = {"attention": attention, "window": window, "rows": rows, "len": length, "warmup_s": warm,
                         **per_step(s, batch, args.max_tokens)}
                    results["steps"].append(r)
                    print(f"{attention:>9} {window:>8} {rows:>5} x {length:<5} {r['requests']:>8} "
                          f"{r['tok_s']:>9.1f} {r['forward_ms']:>10.2f} {r['rest_ms']:>8.2f} {warm:>9.1f}")
                levels = [int(c) for c in args.loop_concurrency.split(",") if c.strip() not in ("", "0")]
                for clients in (levels if (rows, length) == grid[0] else []):
                    for wait in [float(v) for v in args.join_wait_ms.split(",")]:
                        s.join_seconds = wait / 1e3  # the engine's JARVIS_HF_JOIN_WAIT_MS
                        total = args.loop_requests or 8 * clients
                        r = {"attention": attention, "window": window, "join_wait_ms": wait,
                             **closed_loop(s, data, clients, total, args.max_tokens, args.loop_jitter_ms / 1e3)}
                        results["loop"].append(r)
                        print(f"  closed loop, {r['clients']} clients, join wait {wait:g} ms: {r['tok_s']:.1f} "
                              f"tok/s, TTFT p50 {r['ttft_p50_ms']:.1f} ms, p99 {r['ttft_p99_ms']:.1f}, max "
                              f"{r['ttft_max_ms']:.1f}; {r['joined']} joined in {r['joins']} "
                              f"joins of {r['join_ms']:.2f} ms each ({100 * r['join_share']:.0f} % of the wall; "
                              f"prefills {r['prefill_ms']:.2f} ms, {r['prefill_captures']} captured in the loop); "
                              f"forward {r['forward_ms']:.2f} ms per step ({100 * r['forward_share']:.0f} %)")
                    s.join_seconds = 0.0
        if args.kernels and attention == attentions[-1]:
            k = kernels(model, made[-1], data[0], args, sync)
            results["kernels"] = k
            for name, v in k.items():
                if "error" in v:
                    print(f"{name}: {v['error']}")
                    continue
                first = f" (first call {v['first_call_s']:.1f} s)" if "first_call_s" in v else ""
                print(f"{name}: {v['kernels']} kernels, device busy {v['device_busy_ms']:.2f} ms, wall "
                      f"{v['wall_ms']:.2f} ms{first}")
        for s in made:
            s.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
