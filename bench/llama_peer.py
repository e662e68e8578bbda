"""Jarvis's llama_cpp engine vs llama-cpp-python's own server, on the same GGUF, driven by vLLM's benchmark client.

Both servers load the embedded Gemma 3 270M Q4_K_M with the same threads, context and batch size and
one sequence at a time (Jarvis: JARVIS_LLAMA_N_PARALLEL=1; the peer serves one request at a time):

  jarvis  `python -m jarvis serve` (JARVIS_INFERENCE_ENGINE=llama_cpp);
  peer    `python -m llama_cpp.server` with `--logits_all false` (its default computes logits for every
          position, which makes it slower: `--peer-defaults` measures that too).

vLLM's `vllm bench serve` (in process: `vllm.benchmarks.serve`) sends random prompts of --input-len
tokens and asks for --output-len tokens with `ignore_eos` and temperature 0 on both, streaming over
/v1/completions, at each concurrency; the servers alternate round by round (jarvis, peer, peer,
jarvis, ...) so background load hits both alike. Printed per concurrency: output tokens/s, TTFT and
TPOT medians, failed or cut streams (a stream that ends before its tokens is counted as failed by
vLLM's client), and the ratio Jarvis / peer (tokens/s ≥ 1.00 is the goal).

    python bench/llama_peer.py [--concurrency 1,4] [--prompts 16] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"


@contextlib.contextmanager
def peer_server(gguf: Path, threads: int, n_ctx: int, logits_all: bool) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL,
             "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch",
             str(threads), "--n_ctx", str(n_ctx), "--n_batch", "512", "--logits_all", str(logits_all).lower(),
             "--verbose", "false"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                        break
                time.sleep(0.3)
            else:
                log.seek(0)
                raise RuntimeError(f"llama_cpp.server did not start:\n{log.read()[-4000:]}")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=60)


@contextlib.contextmanager
def uuid_request_ids() -> Iterator[None]:
    """llama_cpp.server answers 400 to an x-request-id that is not a UUID, and vLLM's client sends
    "bench-<hex>-<n>": for the peer, each request gets a UUID instead (Jarvis takes either)."""
    import dataclasses
    import uuid

    from vllm.benchmarks import serve
    from vllm.benchmarks.lib import endpoint_request_func as funcs

    original = serve.RequestFuncInput

    @dataclasses.dataclass
    class WithUuid(original):  # type: ignore[misc, valid-type]
        def __post_init__(self) -> None:
            if self.request_id:
                self.request_id = str(uuid.uuid4())

    serve.RequestFuncInput = funcs.RequestFuncInput = WithUuid
    try:
        yield
    finally:
        serve.RequestFuncInput = funcs.RequestFuncInput = original


def vllm_bench(base_url: str, tokenizer: Path, concurrency: int, prompts: int, input_len: int, output_len: int,
               seed: int, uuid_ids: bool = False) -> dict:
    """One `vllm bench serve` run (vLLM's own client, in process) against `base_url`."""
    import argparse as _argparse

    from vllm.benchmarks.serve import add_cli_args, main

    parser = _argparse.ArgumentParser()
    add_cli_args(parser)
    with tempfile.TemporaryDirectory() as out:
        args = parser.parse_args([
            "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", MODEL,
            "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(prompts), "--max-concurrency",
            str(concurrency), "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--percentile-metrics",
            "ttft,tpot,itl",
            "--metric-percentiles", "50,99", "--save-result", "--result-dir", out, "--disable-tqdm"])
        with uuid_request_ids() if uuid_ids else contextlib.nullcontext():
            return main(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--prompts", type=int, default=16, help="requests per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server and concurrency")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--peer-defaults", action="store_true", help="run the peer with logits_all true (its default)")
    args = parser.parse_args()

    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.embedded_model import embedded_model_path
    from jarvis.settings import load_settings

    data_dir = load_settings().data_dir
    gguf, tokenizer = embedded_model_path(data_dir), embedded_hf_model(data_dir)
    n_ctx = 2048
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    with jarvis_server(JARVIS_INFERENCE_ENGINE="llama_cpp", JARVIS_LLAMA_N_PARALLEL="1",
                       JARVIS_LLAMA_N_THREADS=str(args.threads), JARVIS_MAX_MODEL_LEN=str(n_ctx),
                       JARVIS_LLAMA_N_BATCH="512") as jarvis_v1, \
            peer_server(gguf, args.threads, n_ctx, args.peer_defaults) as peer:
        targets = {"jarvis": jarvis_v1.removesuffix("/v1"), "peer": peer}
        for name, url in targets.items():  # warm-up
            vllm_bench(url, tokenizer, 1, 2, args.input_len, 8, 0, uuid_ids=name == "peer")
        for level in levels:
            for r in range(args.rounds):
                order = ("jarvis", "peer") if r % 2 == 0 else ("peer", "jarvis")
                for name in order:
                    print(f"concurrency {level}, round {r + 1}: {name}", file=sys.stderr)
                    runs.setdefault((name, level), []).append(
                        vllm_bench(targets[name], tokenizer, level, args.prompts, args.input_len, args.output_len,
                                   seed=r, uuid_ids=name == "peer"))

    def med(name: str, level: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[(name, level)])

    print(f"\nJarvis llama_cpp vs llama_cpp.server (logits_all {'true' if args.peer_defaults else 'false'}), "
          f"{args.threads} threads, {args.input_len} in / {args.output_len} out, {args.prompts} prompts x "
          f"{args.rounds} rounds; medians over rounds")
    print(f"{'conc':>4} {'jarvis tok/s':>12} {'peer tok/s':>10} {'ratio':>6} {'TTFT p50 j/p ms':>16} "
          f"{'TPOT p50 j/p ms':>16} {'failed j/p':>10}")
    summary = []
    for level in levels:
        j, p = med("jarvis", level, "output_throughput"), med("peer", level, "output_throughput")
        failed = [sum(run["num_prompts"] - run["completed"] for run in runs[(n, level)]) for n in ("jarvis", "peer")]
        row = {"concurrency": level, "jarvis_tok_s": j, "peer_tok_s": p, "ratio": j / p,
               "ttft_p50": [med(n, level, "median_ttft_ms") for n in ("jarvis", "peer")],
               "tpot_p50": [med(n, level, "median_tpot_ms") for n in ("jarvis", "peer")], "failed": failed}
        summary.append(row)
        print(f"{level:>4} {j:>12.1f} {p:>10.1f} {j / p:>6.2f} {row['ttft_p50'][0]:>7.0f} / {row['ttft_p50'][1]:<6.0f} "
              f"{row['tpot_p50'][0]:>7.1f} / {row['tpot_p50'][1]:<6.1f} {failed[0]:>4} / {failed[1]:<4}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
