"""Greedy text across engines and devices, and a LoRA adapter trained on CPU served on the GPU.

  record (here, CPU)   python bench/gpu_parity.py record --out DIR [--adapter ADAPTER_DIR]
      The embedded model's greedy answers to PROMPTS from Jarvis's hf engine in float32 (the reference) and
      from llama_cpp (the Q4_K_M GGUF itself, shown beside it); with --adapter (a `jarvis train` output), the
      hf engine's answers through PEFT with that adapter to ADAPTER_PROMPTS. Writes DIR/reference.json and a
      copy of the adapter under DIR/adapter.
  check (GPU host)     python bench/gpu_parity.py check --gguf FILE --reference DIR [--tokenizer DIR]
      Converts the GGUF with `jarvis models convert`, serves it with Jarvis's hf engine (waves decoded from a
      CUDA graph, bf16 and float32; continuous batching, bf16) and vllm engine (bf16, LoRA on), one after
      the other, asks the same prompts greedily, and prints per engine how many answers equal the reference
      and how many leading tokens they share on average; the adapter's answers through PEFT (hf) and through
      vLLM's LoRA against PEFT's on CPU.

Greedy text agrees exactly only at the same precision: bf16 rounds differently from float32 and
llama.cpp's Q4_K_M weights differ from their dequantized copy, so those rows report how far they agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from gpu_serving import alive, convert_gguf, free_port, tokenizer_folder

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colors are", "Once upon a time, in a small village,", "import numpy as np\n",
           "The largest planet in the solar system is", "To make a cup of tea, first"]
MAX_TOKENS = 32


# --- one Jarvis server at a time ---------------------------------------------------------------------


@contextlib.contextmanager
def jarvis(settings: dict[str, str], work: Path, label: str, timeout_s: float = 420) -> Iterator[str]:
    """A Jarvis server with `settings` in its own process session; yields its base URL, then stops it."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}, **settings,
           "JARVIS_HOST": "127.0.0.1", "JARVIS_PORT": str(port), "JARVIS_STATE_DIR": str(work / f"state-{label}")}
    env.setdefault("JARVIS_DATA_DIR", os.environ.get("JARVIS_DATA_DIR", str(work / "data")))
    log = work / f"server-{label}.log"
    process = subprocess.Popen([sys.executable, "-m", "jarvis", "serve"], env=env, cwd=work,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base, started = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200 and health.json().get("status") == "ready":
                    break
            except httpx.HTTPError:
                pass
            if not alive(process.pid):
                raise SystemExit(f"{label} exited before it was ready:\n{log.read_text()[-5000:]}")
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"{label} not ready within {timeout_s:.0f} s:\n{log.read_text()[-5000:]}")
            time.sleep(1)
        print(f"{label} ready after {time.monotonic() - started:.0f} s", flush=True)
        yield base
    finally:
        if alive(process.pid):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def answers(base: str, model: str, prompts: list[str], chat: bool) -> list[str]:
    out = []
    with httpx.Client(base_url=base, timeout=300) as client:
        for prompt in prompts:
            if chat:
                body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
                path = "/v1/chat/completions"
            else:
                body, path = {"model": model, "prompt": prompt}, "/v1/completions"
            r = client.post(path, json={**body, "max_tokens": MAX_TOKENS, "temperature": 0})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            out.append(choice["message"]["content"] if chat else choice["text"])
    return out


def engine_info(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/v1/engine", timeout=30).json()


def served_model(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def with_adapter(base: str, name: str, path: Path, prompts: list[str]) -> list[str]:
    """Load the adapter into the running server (no restart), then its answers."""
    r = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=300)
    r.raise_for_status()
    return answers(base, name, prompts, chat=True)


# --- record (CPU) ------------------------------------------------------------------------------------


def adapter_prompts(data: Path, count: int) -> list[str]:
    """The first `count` instructions of a training file (instruction/output, prompt/response or messages)."""
    prompts = []
    for line in data.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        text = record.get("instruction") or record.get("prompt") or next(
            (m["content"] for m in record.get("messages", []) if m.get("role") == "user"), None)
        if text:
            prompts.append(text)
        if len(prompts) == count:
            break
    return prompts


def record(args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    reference: dict[str, Any] = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    common = {"JARVIS_DEVICE": "cpu"}
    with jarvis({**common, "JARVIS_INFERENCE_ENGINE": "llama_cpp"}, work, "llama_cpp") as base:
        reference["llama_cpp"] = answers(base, served_model(base), PROMPTS, chat=False)
    settings = {**common, "JARVIS_INFERENCE_ENGINE": "hf", "JARVIS_DTYPE": "fp32", "JARVIS_HF_BATCHING": "waves",
                "JARVIS_ADAPTER_ROOT": str(out)}
    with jarvis(settings, work, "hf") as base:
        model = served_model(base)
        reference["hf_cpu_fp32"] = answers(base, model, PROMPTS, chat=False)
        if args.adapter:
            shutil.copytree(args.adapter, out / "adapter", dirs_exist_ok=True)
            prompts = adapter_prompts(args.data, args.adapter_prompts)
            base_answers = answers(base, model, prompts, chat=True)
            reference["adapter"] = {"name": args.adapter_name, "prompts": prompts, "base_cpu_fp32": base_answers,
                                    "peft_cpu_fp32": with_adapter(base, args.adapter_name, out / "adapter", prompts)}
    (out / "reference.json").write_text(json.dumps(reference, indent=2))
    print(json.dumps(reference, indent=2))


# --- check (GPU) -------------------------------------------------------------------------------------


def shared_tokens(tokenizer: Any, a: str, b: str) -> tuple[int, int]:
    """Leading tokens `a` and `b` share, and the tokens of `b`."""
    x, y = tokenizer.encode(a, add_special_tokens=False), tokenizer.encode(b, add_special_tokens=False)
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n, len(y)


def agreement(tokenizer: Any, got: list[str], want: list[str]) -> str:
    same = sum(g == w for g, w in zip(got, want))
    shares = [shared_tokens(tokenizer, g, w) for g, w in zip(got, want)]
    lead = sum(s for s, _ in shares) / len(shares)
    return (f"{same}/{len(want)} identical, {lead:.1f} of {sum(t for _, t in shares) / len(shares):.1f} "
            "leading tokens shared")


def check(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    started = time.monotonic()
    reference = json.loads((args.reference / "reference.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    where = args.work / "gemma-3-270m"  # where gpu_serving looks
    folder = convert_gguf(args.gguf, where / "gemma-3-270m", tokenizer_folder(args.tokenizer, where) if args.tokenizer
                          else None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    want = reference["hf_cpu_fp32"]
    print(f"greedy answers ({len(PROMPTS)} prompts, {MAX_TOKENS} tokens) against the hf engine in float32 on CPU:")
    print(f"  {'llama_cpp (Q4_K_M) CPU':<28} {agreement(tokenizer, reference['llama_cpp'], want)}", flush=True)
    adapter = reference.get("adapter")
    base_settings = {"JARVIS_MODEL_NAME": str(folder), "JARVIS_SERVED_MODEL_NAME": "gemma-3-270m",
                     "JARVIS_DEVICE": args.device, "JARVIS_MAX_MODEL_LEN": "2048",
                     "JARVIS_ADAPTER_ROOT": str(args.reference)}
    # each row: the base prompts first (graphs and continuous batching serve them), then the adapter loaded
    # over HTTP (its requests take PEFT's per-row path on hf, vLLM's LoRA kernels on vllm)
    runs = {
        "vllm bf16": {"JARVIS_INFERENCE_ENGINE": "vllm", "JARVIS_VLLM_DTYPE": "bf16",
                      "JARVIS_VLLM_GPU_MEMORY_UTILIZATION": "0.3",
                      "JARVIS_VLLM_ENABLE_LORA": "true" if adapter else "false"},
        "hf continuous bf16": {"JARVIS_INFERENCE_ENGINE": "hf", "JARVIS_DTYPE": "bf16",
                               "JARVIS_HF_BATCHING": "continuous"},
        "hf waves+graphs bf16": {"JARVIS_INFERENCE_ENGINE": "hf", "JARVIS_DTYPE": "bf16", "JARVIS_HF_BATCHING": "waves",
                                 "JARVIS_HF_DECODE": "graphs"},
        "hf waves+graphs fp32": {"JARVIS_INFERENCE_ENGINE": "hf", "JARVIS_DTYPE": "fp32", "JARVIS_HF_BATCHING": "waves",
                                 "JARVIS_HF_DECODE": "graphs"},
    }
    results: dict[str, Any] = {"reference": reference}
    for label, settings in runs.items():
        slug = label.replace(" ", "-").replace("+", "-")
        if time.monotonic() - started > args.budget:
            print(f"  {label:<28} not run: the {args.budget:.0f} s budget is spent", flush=True)
            continue
        try:
            with jarvis({**base_settings, **settings}, work, slug) as base:
                row: dict[str, Any] = {"answers": answers(base, "gemma-3-270m", PROMPTS, chat=False),
                                       "engine": engine_info(base).get("batching")}
                if adapter:
                    row["adapter"] = with_adapter(base, adapter["name"], args.reference / "adapter",
                                                  adapter["prompts"])
        except SystemExit as failure:  # one engine failing to start does not hide the others' rows
            row = {"error": str(failure)[-3000:]}
        results[label] = row
        if "error" in row:
            print(f"  {label:<28} failed: {row['error'][-600:]}", flush=True)
            continue
        print(f"  {label:<28} {agreement(tokenizer, row['answers'], want)}", flush=True)
        if adapter:
            print(f"  {'':<4}adapter {adapter['name']!r} vs PEFT on CPU: "
                  f"{agreement(tokenizer, row['adapter'], adapter['peft_cpu_fp32'])}", flush=True)
    (work / "parity.json").write_text(json.dumps(results, indent=2, default=str))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "parity.json", args.out / "parity.json")
    if adapter:
        changed = sum(a != b for a, b in zip(adapter["peft_cpu_fp32"], adapter["base_cpu_fp32"]))
        print(f"(the adapter changes {changed}/{len(adapter['prompts'])} of the base model's answers on CPU)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    sub = parser.add_subparsers(dest="mode", required=True)
    rec = sub.add_parser("record", help="the CPU reference")
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--adapter", type=Path, help="a `jarvis train` output folder")
    rec.add_argument("--adapter-name", default="facts")
    rec.add_argument("--data", type=Path, default=Path(__file__).parent.parent / "tests" / "data" / "train_small.jsonl",
                     help="where the adapter's prompts come from (its training data)")
    rec.add_argument("--adapter-prompts", type=int, default=6)
    chk = sub.add_parser("check", help="the GPU rows")
    chk.add_argument("--gguf", type=Path, required=True)
    chk.add_argument("--reference", type=Path, required=True, help="the folder `record` wrote")
    chk.add_argument("--tokenizer", type=Path, help="a tokenizer folder (tokenizer.json or .json.gz) to use instead "
                     "of the GGUF's (needed with transformers before 5.19)")
    chk.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    chk.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_serving",
                     help="the converted model goes to WORK/gemma-3-270m/, where gpu_serving.py --gguf looks")
    chk.add_argument("--budget", type=float, default=480, help="seconds; no new row starts after it")
    chk.add_argument("--device", default="cuda", help="cpu tries the script without a GPU (the graphs rows fail)")
    args = parser.parse_args(argv)
    record(args) if args.mode == "record" else check(args)


if __name__ == "__main__":
    main()
