"""How long does a long prompt stall the event loop while it is prepared? Inline vs on a worker thread.

The running streams of a server share one event loop: while a new request's prompt is tokenized on it, no
stream gets its next chunk. `Runtime.off_loop` prepares a body of PREPARE_OFF_LOOP_BYTES or more on a worker
thread when the engine's tokenizer releases the GIL (a Hugging Face fast tokenizer does). This measures both
ways through Jarvis's own runtime and `prepare` (chat rendering, checks, tokenizing), with the embedded model's
real tokenizer in an engine that only tokenizes:

  loop     a ticker that wakes every millisecond stands for the running streams; its lateness (how long past
           its millisecond it woke) is how long a chunk would have waited. p50, p99 and the worst.
  prepare  each request's preparation time as its handler waits for it (the thread hop included).

Requests arrive at --rates per second (Poisson), each a completion of random text of --tokens tokens (decoded
from random ids, as `vllm bench serve`'s random dataset makes them). The two ways take turns, --rounds times,
on one process; the table gives the medians and off-loop / inline.

    python bench/prepare_stall.py [--tokenizer DIR] [--rates 20,100] [--tokens 256,2048] [--seconds 5]
                                  [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jarvis import hookimpl
from jarvis.bootstrap import bootstrap
from jarvis.engine import Engine, GenerationRequest, ModelInfo
from jarvis.plugin_manager import create_plugin_manager
from jarvis.plugins.evaluation.bench_load import percentile
from jarvis.runtime import PREPARE_OFF_LOOP_BYTES, EngineRuntime

HERE = Path(__file__).parent
MODES = ("inline", "off-loop")


class TokenizerEngine(Engine):
    """The embedded model's tokenizer and nothing else: the bench only prepares requests."""

    name = "tokenizer-only"
    folder: Path

    def __init__(self, settings: object) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)

    def model_info(self) -> ModelInfo:
        return ModelInfo(id="tokenizer-only", max_model_len=65536, bos_token=self.tokenizer.bos_token,
                         eos_token=self.tokenizer.eos_token, vocab_size=len(self.tokenizer))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class Plugin:
    @hookimpl
    def jarvis_register_engines(self, register: Any) -> None:
        register("tokenizer-only", TokenizerEngine)


async def measure(runtime: EngineRuntime, texts: list[str], rate: float, seconds: float, seed: int
                  ) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    late: list[float] = []
    waits: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.001)
            late.append(loop.time() - before - 0.001)

    async def one(text: str) -> None:
        started = time.perf_counter()
        request = GenerationRequest(prompt=text, model="tokenizer-only", kind="completion", max_tokens=1)
        await runtime.off_loop(len(text.encode()), runtime.prepare, request)
        waits.append(time.perf_counter() - started)

    tick = asyncio.create_task(ticker())
    draw = random.Random(seed)
    tasks, end = [], loop.time() + seconds
    while loop.time() < end:
        await asyncio.sleep(draw.expovariate(rate))
        tasks.append(asyncio.create_task(one(draw.choice(texts))))
    await asyncio.gather(*tasks)
    done.set()
    await tick
    def ms(values: list[float], q: float) -> float:
        return (percentile(values, q) or 0.0) * 1000

    return {"requests": len(waits), "late_p50": ms(late, 50), "late_p99": ms(late, 99), "late_max": ms(late, 100),
            "prepare_p50": ms(waits, 50), "prepare_p99": ms(waits, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: the embedded model's, "
                        "converted on first use)")
    parser.add_argument("--rates", default="20,100", help="requests per second, comma-separated")
    parser.add_argument("--tokens", default="256,2048", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "prepare_stall.json")
    args = parser.parse_args()
    if args.tokenizer is None:
        from jarvis.backends.model_tools.convert import embedded_hf_model
        from jarvis.settings import load_settings

        args.tokenizer = embedded_hf_model(load_settings().data_dir)
    TokenizerEngine.folder = args.tokenizer
    plugins = create_plugin_manager()
    plugins.register(Plugin(), name="tokenizer-only")
    with tempfile.TemporaryDirectory() as state:
        boot = bootstrap(plugins=plugins, inference_engine="tokenizer-only", state_dir=state)
        runtime = EngineRuntime(boot.settings, boot.registries, boot.plugins.relay)
        asyncio.run(runtime.start())
        engine = runtime.engine
        assert isinstance(engine, TokenizerEngine)
        draw = random.Random(0)
        rows: dict[tuple[int, float, str], list[dict[str, float]]] = {}
        for tokens in (int(t) for t in args.tokens.split(",")):
            vocab = len(engine.tokenizer)
            texts = [engine.tokenizer.decode([draw.randrange(1000, vocab - 1000) for _ in range(tokens)])
                     for _ in range(32)]
            size = statistics.median(len(t.encode()) for t in texts)
            print(f"{tokens}-token prompts: {size / 1024:.1f} KiB of text (off the loop from "
                  f"{PREPARE_OFF_LOOP_BYTES / 1024:.0f} KiB)")
            for rate in (float(r) for r in args.rates.split(",")):
                for round_ in range(args.rounds):
                    for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                        engine.tokenizer_releases_gil = mode == "off-loop"
                        result = asyncio.run(measure(runtime, texts, rate, args.seconds, round_))
                        rows.setdefault((tokens, rate, mode), []).append(result)
    table = Table(title="event-loop lateness while long prompts are prepared (ms, medians of rounds)")
    for column in ("prompt", "req/s", "way", "late p50", "late p99", "late max", "prepare p50", "prepare p99",
                   "p99 off/inline"):
        table.add_column(column, justify="right")
    report = []
    for (tokens, rate, mode), results in rows.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        report.append({"tokens": tokens, "rate": rate, "mode": mode, **median, "rounds": results})
        inline = rows[(tokens, rate, "inline")]
        ratio = median["late_p99"] / statistics.median(r["late_p99"] for r in inline) if mode == "off-loop" else None
        table.add_row(str(tokens), f"{rate:g}", mode, *(f"{median[k]:.2f}" for k in
                      ("late_p50", "late_p99", "late_max", "prepare_p50", "prepare_p99")),
                      f"{ratio:.2f}" if ratio is not None else "")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
