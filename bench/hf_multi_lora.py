"""The transformers engine under a mixed multi-LoRA load: N adapters at once vs the base model alone.

One process, one model, Jarvis's wave scheduler (`BatchScheduler`) driven directly. --adapters random PEFT
LoRA adapters (rank --rank on the attention and MLP projections, B drawn so each changes the output) are
loaded into one PeftModel; C requests go in at once, request i to adapter i mod N, each generating exactly
--max-tokens tokens (greedy, end of sequence ignored). Paths, taking turns round by round:

  base      the plain model, no adapter loaded (the ceiling);
  stacked   N adapters, the engine's stacked per-row LoRA (backends/hf/stacked_lora.py: two batched matmuls
            per LoRA layer whatever the number of adapters);
  stacked-dynamic  the same stacks in a "dynamic" wave (a growing cache, finished rows pruned), what the
            engine did with adapters before they rode the static decode; run when --decode is not dynamic;
  peft      N adapters, PEFT's own mixed-batch routing (`adapter_names=`: a loop over the adapters in every
            LoRA layer), what the engine did before the stacks.

base and stacked decode as --decode says (default: the engine's own, "graphs" on CUDA, "dynamic" on CPU):
with adapters loaded a static wave steps eager, without them "graphs" replays a CUDA graph.

Printed: tokens/s per path and concurrency (median of --rounds), and stacked/peft and stacked/base; every
request must produce exactly --max-tokens tokens. (That stacked computes what PEFT computes is
tests/backends/test_stacked_lora.py's business.)

    python bench/hf_multi_lora.py [--adapters 4] [--concurrency 4,8] [--max-tokens 32] [--rounds 3]
    python bench/hf_multi_lora.py --device cuda --dtype bf16 --random-weights --concurrency 16,64
    python bench/hf_multi_lora.py --paths base,stacked,stacked-dynamic --decode graphs ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_batching import NoTokenizer, load_model, prompts  # noqa: E402

from jarvis.backends.hf.stacked_lora import BASE, StackedLora  # noqa: E402
from jarvis.backends.hf.waves import BatchScheduler, ModelHandle  # noqa: E402
from jarvis.engine import EngineStats, PreparedRequest  # noqa: E402

HERE = Path(__file__).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_adapters(model, n: int, rank: int, folder: Path):
    """`model` wrapped in a PeftModel holding n random adapters a0..a{n-1}."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS)
    maker = get_peft_model(model, config)
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for key, weight in maker.named_parameters():
                if "lora_" in key:
                    weight.normal_(0.0, 0.02)
        maker.save_pretrained(str(folder / f"a{i}"))
    base = maker.unload()
    peft = PeftModel.from_pretrained(base, str(folder / "a0"), adapter_name="a0")
    for i in range(1, n):
        peft.load_adapter(str(folder / f"a{i}"), adapter_name=f"a{i}")
    return peft.eval()


def run(scheduler: BatchScheduler, batch: list[list[int]], adapters: list[str | None], max_tokens: int):
    """Submit `batch` at once (row i through adapters[i]); (seconds, tokens, each row's token ids)."""
    done, lock, outputs = threading.Event(), threading.Lock(), {}

    def emitter(i: int):
        def emit(chunk):
            if isinstance(chunk, BaseException):
                raise chunk
            if chunk.finish_reason:
                with lock:
                    outputs[i] = chunk.completion_tokens
                    if len(outputs) == len(batch):
                        done.set()
        return emit

    start = time.perf_counter()
    for i, (ids, adapter) in enumerate(zip(batch, adapters)):
        req = PreparedRequest(prompt=None, model="bench", max_tokens=max_tokens, temperature=0.0, adapter=adapter,
                              ignore_eos=True)
        scheduler.submit(req, ids, emitter(i), threading.Event())
    done.wait()
    seconds = time.perf_counter() - start
    return seconds, sum(outputs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", default="4,8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", choices=("dynamic", "static", "graphs"),
                        help="the base and stacked paths' wave decode (default: graphs on CUDA, dynamic on CPU)")
    parser.add_argument("--paths", default="base,stacked,stacked-dynamic,peft",
                        help="which paths to run, comma-separated (base and stacked always)")
    parser.add_argument("--out", type=Path, default=Path("jarvis-reports"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    args.decode = args.decode or ("graphs" if args.device.startswith("cuda") else "dynamic")
    wanted = {"base", "stacked", *args.paths.split(",")}
    if args.decode == "dynamic":
        wanted.discard("stacked-dynamic")
    if not wanted <= {"base", "stacked", "stacked-dynamic", "peft"}:
        parser.error("--paths takes base, stacked, stacked-dynamic and peft")

    base_model = load_model(args)
    data = prompts(max(levels), args.prompt_len, base_model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        peft = with_adapters(load_model(args), args.adapters, args.rank, Path(tmp))
    names = [f"a{i}" for i in range(args.adapters)]
    lock, device = threading.Lock(), torch.device(args.device)
    handles = {path: ModelHandle(base_model if path == "base" else peft, NoTokenizer(), device, frozenset(), lock,
                                 EngineStats())
               for path in ("base", "stacked", "stacked-dynamic", "peft") if path in wanted}
    if args.decode == "graphs":
        # one scheduler replays the CUDA graphs of both, as in the engine, whose model and stack change at an
        # adapter load
        handles["stacked"] = handles["base"]
    stacked = StackedLora.build(peft)
    assert stacked is not None
    for path, h in handles.items():
        if path.startswith("stacked") and h.model is peft:
            h.stacked = stacked

    def use(path: str) -> None:
        """peft and stacked share one PeftModel: PEFT's layers on for the peft path, off for the stacks (whose
        hooks add nothing outside `StackedLora.use`; the stack stays, as a compiled step needs it to)."""
        if path == "peft":
            peft.base_model.enable_adapter_layers()
        else:
            peft.base_model.disable_adapter_layers()
        if args.decode == "graphs":
            handles["base"].model, handles["base"].stacked = (base_model, None) if path == "base" else (peft, stacked)

    shared = {id(h): BatchScheduler(h, max_batch_size=max(levels), gather_seconds=0.005,
                                    decode=args.decode if path in ("base", "stacked") else "dynamic",
                                    max_len=args.prompt_len + args.max_tokens + 8) for path, h in handles.items()}
    schedulers = {path: shared[id(h)] for path, h in handles.items()}
    for s in shared.values():
        s.start()
    results: dict[str, dict[int, list[float]]] = {p: {c: [] for c in levels} for p in schedulers}
    for c in levels:  # warm-up
        for path in schedulers:
            use(path)
            run(schedulers[path], data[:c], [None if path == "base" else names[i % len(names)] for i in range(c)], 4)
    for r in range(args.rounds):
        for c in levels:
            order = list(schedulers) if r % 2 == 0 else list(schedulers)[::-1]
            for path in order:
                use(path)
                adapters = [None if path == "base" else names[i % len(names)] for i in range(c)]
                seconds, tokens = run(schedulers[path], data[:c], adapters, args.max_tokens)
                assert tokens == c * args.max_tokens, (path, tokens)
                results[path][c].append(tokens / seconds)
                print(f"round {r} C={c} {path}: {tokens / seconds:.1f} tok/s", flush=True)
    for s in shared.values():
        s.stop()

    weights = "random-weight " if args.random_weights else ""
    print(f"\n{args.adapters} adapters (rank {args.rank}), {weights}Gemma-3-270M, "
          f"{args.dtype} on {args.device}, {args.prompt_len}-token prompts, {args.max_tokens} tokens, "
          f"median of {args.rounds} rounds; request i to adapter i mod {args.adapters} ({BASE} for base); "
          f"base and stacked decode {args.decode!r}")
    paths = list(results)
    others = [p for p in ("stacked-dynamic", "peft") if p in results]
    print(f"{'C':>4} " + " ".join(f"{p + (' tok/s' if p == 'base' else ''):>16}" for p in paths)
          + " " + " ".join(f"{'stacked/' + p:>22}" for p in ["base", *others]))
    summary = {}
    for c in levels:
        m = {p: statistics.median(results[p][c]) for p in results}
        summary[c] = {**m, **{f"stacked_vs_{p}": m["stacked"] / m[p] for p in ["base", *others]}}
        print(f"{c:>4} " + " ".join(f"{m[p]:>16.1f}" for p in paths)
              + " " + " ".join(f"{m['stacked'] / m[p]:>21.2f}x" for p in ["base", *others]))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "hf_multi_lora.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": results,
                               "summary": summary}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
