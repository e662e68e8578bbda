"""Jarvis's llama_cpp engine vs llama-cpp-python's server and llama.cpp's own `llama-server`, on the same GGUF.

All servers load the embedded Gemma 3 270M Q4_K_M with the same settings, each set explicitly:
--threads (n_threads and n_threads_batch), --n-batch (default: JARVIS_LLAMA_N_BATCH's, 512; n_ubatch
min(n_batch, 512) everywhere), --n-ctx tokens of context per sequence (default: JARVIS_MAX_MODEL_LEN's,
4096), no GPU layers:

  jarvis            `python -m jarvis serve` with JARVIS_INFERENCE_ENGINE=llama_cpp, JARVIS_LLAMA_N_THREADS,
                    JARVIS_LLAMA_N_BATCH, JARVIS_MAX_MODEL_LEN and JARVIS_LLAMA_N_PARALLEL = --jarvis-parallel
                    (default: the environment's JARVIS_LLAMA_N_PARALLEL, else the engine's default): sequences
                    decoded at once;
  llama-cpp-python  `python -m llama_cpp.server` (one sequence at a time) with --n_threads/--n_threads_batch,
                    --n_batch, --n_ctx, --logits_all false (its default computes logits for every position,
                    which is slower), --interrupt_requests false (its default ends the running stream early,
                    with a normal [DONE], whenever another request waits: at concurrency > 1 most streams come
                    back cut short) and --use_mlock false (as Jarvis);
  llama-server      llama.cpp's C++ server, built by bench/build_llama_server.sh from the very llama.cpp that
                    llama-cpp-python vendors (same version, same CMAKE args as run.sh), with --parallel N slots
                    (--server-parallel, default: the highest --concurrency) and --ctx-size N x n_ctx (it splits
                    the context among slots; --no-kv-unified: each slot its own n_ctx, as Jarvis), --threads,
                    --threads-batch, --batch-size, --ubatch-size, and the context settings of Jarvis and
                    llama-cpp-python, whose llama.cpp context defaults differ from llama-server's: --flash-attn off
                    (llama-server: auto, i.e. on for the CPU) and --swa-full (Gemma 3's sliding-window layers keep a
                    full-size cache; llama-server's smaller one also makes it save context checkpoints).
`--peer-defaults` runs the peers with their own defaults instead (llama-cpp-python: logits_all and
interrupt_requests true; llama-server: flash attention auto, small SWA cache), to show what those cost.
--peers picks them (default: both, llama-server only where its binary is built or --llama-server names one;
naming llama-server in --peers builds it if need be).

vLLM's `vllm bench serve` (in process: `vllm.benchmarks.serve`) sends random prompts of --input-len
tokens, streaming over /v1/completions at temperature 0, and asks for --output-len tokens with
`ignore_eos`. llama-cpp-python has no `ignore_eos`, so it and Jarvis also get a logit_bias of -100 on
every end-of-generation token of the GGUF (Gemma 3: <eos>, <end_of_turn>, </s>; read from llama.cpp's
`llama_vocab_is_eog`), which both honour: neither can end a stream early on an end token. llama-server
honours `ignore_eos` (it biases the same end tokens to -inf), so it gets no logit_bias. All decode greedily
with no repetition penalty: vLLM's client sends `repetition_penalty: 1.0`, which the peers ignore (their
field is `repeat_penalty`; llama-cpp-python's default is 1.1, a different output and a penalty pass), so the
peers also get `repeat_penalty: 1.0` (Jarvis rejects unknown fields, so only the peers get it).
The servers take turns round by round (jarvis, peer 1, peer 2, then the order rotated and reversed, ...) so
background load hits all alike; --rounds (default 3) runs per server and concurrency. Each run (concurrency,
round) sends prompts of its own seed, the same on every side: llama-server (and Jarvis) keep each finished
sequence's cache in its slot and would read a prompt sent before in no time.

How to read the table (a row per concurrency and peer; figures are medians over rounds; Jarvis's own
figures repeat on each peer's row):
  tok/s j / p     output tokens per second (tokens received / wall time), Jarvis / peer;
  ratio           Jarvis tok/s / peer tok/s (≥ 1.00: Jarvis is faster);
  TTFT, TPOT      median time to first token and per output token after the first, Jarvis / peer;
  failed j/p      requests that errored (all rounds together);
  cut j/p         streams that ended without finish_reason "length", i.e. before the tokens asked (vLLM's
                  client counts them as successes), all rounds together;
  short j/p       tokens asked minus tokens received, all rounds together;
  same text       requests whose streamed text is identical on both sides (same prompts, greedy decoding of
                  the same GGUF; llama-cpp-python's text loses bytes of multi-byte characters split across
                  tokens; batched decoding of several sequences may round differently from one at a time);
  flag            TRUNC(side) when a side failed, cut streams or came back short: its tok/s measures less
                  work than was asked, so the ratio is not a like-for-like comparison.
Tokens received per request: the server's usage.completion_tokens where it streams usage (Jarvis and
llama-server do); else the tokens asked where the stream finished with "length" (llama-cpp-python sends no
usage, and vLLM's re-tokenization of its text miscounts); else vLLM's re-tokenization of the streamed text.
--out DIR writes every run's raw vLLM result (with each stream's finish_reason) to DIR/llama_peer.json.

    python bench/llama_peer.py [--concurrency 1,4] [--prompts 16] [--rounds 3] [--threads N]
                               [--input-len 128] [--output-len 64] [--n-ctx 4096] [--n-batch 512]
                               [--peers llama-cpp-python,llama-server] [--llama-server PATH]
                               [--jarvis-parallel N] [--server-parallel N] [--peer-defaults] [--out DIR]
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
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"
PEERS = ("llama-cpp-python", "llama-server")
BUILD_SCRIPT = Path(__file__).parent / "build_llama_server.sh"
#: Tokens a llama.cpp micro-batch holds at most: llama-cpp-python's n_ubatch default (and Jarvis's), llama-server's.
MAX_UBATCH = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(name: str, command: list[str], port: int, ready_path: str) -> Iterator[str]:
    """Runs `command` until the block ends; yields its base URL once GET `ready_path` answers 200."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=5).status_code == 200:
                        break
                time.sleep(0.3)
            else:
                log.seek(0)
                raise RuntimeError(f"{name} did not start:\n{log.read()[-4000:]}")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=60)


def llama_cpp_python_server(gguf: Path, threads: int, n_ctx: int, n_batch: int,
                            peer_defaults: bool) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    flag = "true" if peer_defaults else "false"
    return serving("llama_cpp.server", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch",
        str(threads), "--n_ctx", str(n_ctx), "--n_batch", str(n_batch), "--n_gpu_layers", "0",
        "--logits_all", flag, "--interrupt_requests", flag, "--use_mlock", "false", "--verbose", "false"],
        port, "/v1/models")


def llama_server_command(binary: Path, gguf: Path, threads: int, n_ctx: int, n_batch: int, parallel: int,
                         peer_defaults: bool, port: int) -> list[str]:
    """llama-server with `parallel` slots of `n_ctx` tokens each (it splits --ctx-size among its slots)."""
    command = [str(binary), "--model", str(gguf), "--alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(threads), "--threads-batch", str(threads), "--ctx-size", str(parallel * n_ctx),
               "--parallel", str(parallel), "--no-kv-unified", "--batch-size", str(n_batch),
               "--ubatch-size", str(min(n_batch, MAX_UBATCH)), "--n-gpu-layers", "0", "--no-webui"]
    if not peer_defaults:  # llama.cpp's context defaults, which Jarvis and llama-cpp-python run with
        command += ["--flash-attn", "off", "--swa-full"]
    return command


def find_llama_server(explicit: Path | None, build: bool) -> Path | None:
    """`explicit`, else bench/build_llama_server.sh's cached binary; built first if `build` and not there yet."""
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise SystemExit(f"--llama-server {explicit}: not an executable")
        return explicit
    cached = subprocess.run([str(BUILD_SCRIPT), "--path"], capture_output=True, text=True)
    if cached.returncode == 0:
        return Path(cached.stdout.strip())
    if not build:
        return None
    print(f"building llama-server with {BUILD_SCRIPT} (once per machine, several minutes)", file=sys.stderr)
    built = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(built.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def uuid_request_ids() -> Iterator[None]:
    """llama_cpp.server answers 400 to an x-request-id that is not a UUID, and vLLM's client sends
    "bench-<hex>-<n>": for llama-cpp-python, each request gets a UUID instead (Jarvis and llama-server take either)."""
    import dataclasses
    import uuid

    from vllm.benchmarks import serve
    from vllm.benchmarks.lib import endpoint_request_func as funcs

    original = serve.RequestFuncInput

    @dataclasses.dataclass
    class WithUuid(original):  # type: ignore[misc, valid-type]
        def __post_init__(self) -> None:
            if self.request_id:  # type: ignore[has-type]
                self.request_id = str(uuid.uuid4())

    serve.RequestFuncInput = funcs.RequestFuncInput = WithUuid  # type: ignore[misc]
    try:
        yield
    finally:
        serve.RequestFuncInput = funcs.RequestFuncInput = original  # type: ignore[misc]


@contextlib.contextmanager
def connection_per_request() -> Iterator[None]:
    """llama-server closes the connection after each streamed response (while its headers announce keep-alive),
    and vLLM's client reuses connections: a request sent on the closed one before the client sees it closed fails
    with "Server disconnected" (here, 2 runs in 12 of 4 requests at concurrency 1). For llama-server, each request
    opens its own connection instead (on 127.0.0.1, a fraction of a millisecond)."""
    import aiohttp

    original = aiohttp.TCPConnector

    class Closing(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("keepalive_timeout", None)  # not allowed with force_close
            super().__init__(*args, **{**kwargs, "force_close": True})

    aiohttp.TCPConnector = Closing  # type: ignore[misc]
    try:
        yield
    finally:
        aiohttp.TCPConnector = original  # type: ignore[misc]


@contextlib.contextmanager
def finish_reasons(reasons: list[str | None]) -> Iterator[None]:
    """Appends each stream's finish_reason (None: the stream ended without one) to `reasons`. A stream that
    finished with "length" produced exactly the max_tokens asked (all servers say so only then); where the
    server streams no usage (llama-cpp-python), vLLM's client would count its tokens by re-tokenizing the streamed
    text, which miscounts (its stream drops bytes of multi-byte characters split across tokens):
    such a stream is counted as the tokens asked instead."""
    import contextvars

    from vllm.benchmarks.lib import endpoint_request_func as funcs

    current: contextvars.ContextVar[list[str | None]] = contextvars.ContextVar("finish_reason")
    handler, request = funcs.StreamedResponseHandler, funcs.ASYNC_REQUEST_FUNCS["openai"]

    class Recording(handler):  # type: ignore[misc, valid-type]
        def add_chunk(self, chunk_bytes: bytes) -> list[str]:
            messages = handler.add_chunk(self, chunk_bytes)
            for message in messages:
                data = message.removeprefix("data: ")
                if data.startswith("{"):
                    for choice in json.loads(data).get("choices") or []:
                        if choice.get("finish_reason"):
                            current.get()[0] = choice["finish_reason"]
            return messages

    async def recorded(request_func_input: Any, *args: Any, **kwargs: Any) -> Any:
        holder: list[str | None] = [None]
        current.set(holder)
        output = await request(request_func_input, *args, **kwargs)
        if output.success and holder[0] == "length" and not output.output_tokens:
            output.output_tokens = request_func_input.output_len
        reasons.append(holder[0] if output.success else "failed")
        return output

    funcs.StreamedResponseHandler = Recording  # type: ignore[misc]
    funcs.ASYNC_REQUEST_FUNCS["openai"] = recorded
    try:
        yield
    finally:
        funcs.StreamedResponseHandler = handler  # type: ignore[misc]
        funcs.ASYNC_REQUEST_FUNCS["openai"] = request


def end_tokens(gguf: Path) -> list[int]:
    """Every token id llama.cpp treats as end of generation in this GGUF (Gemma 3: <eos>, <end_of_turn>, </s>)."""
    import llama_cpp

    vocab_model = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(vocab_model.model)
    ids = [t for t in range(vocab_model.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    vocab_model.close()
    return ids


def vllm_bench(base_url: str, tokenizer: Path, concurrency: int, prompts: int, input_len: int, output_len: int,
               seed: int, extra_body: dict[str, Any], side: str) -> dict[str, Any]:
    """One `vllm bench serve` run (vLLM's own client, in process) against `base_url`."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    with tempfile.TemporaryDirectory() as out:
        args = parser.parse_args([
            "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", MODEL,
            "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(prompts), "--max-concurrency",
            str(concurrency), "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--percentile-metrics",
            "ttft,tpot,itl", "--metric-percentiles", "50,99", "--extra-body", json.dumps(extra_body),
            "--save-result", "--save-detailed", "--result-dir", out, "--disable-tqdm"])
        reasons: list[str | None] = []
        with uuid_request_ids() if side == "llama-cpp-python" else contextlib.nullcontext(), \
                connection_per_request() if side == "llama-server" else contextlib.nullcontext(), \
                finish_reasons(reasons):
            result = main(args)
        return {**result, "finish_reasons": reasons[-prompts:]}  # the last ones: vLLM first sends a test request


def received(run: dict[str, Any], asked: int) -> dict[str, int]:
    """Requests that failed, streams cut short and tokens missing in one run (tokens asked: `asked` each)."""
    lens = run.get("output_lens") or []
    errors = run.get("errors") or []
    failed = run["num_prompts"] - run["completed"]
    ok = [n for n, e in zip(lens, errors, strict=False) if not e] if errors else lens
    cut = sum(1 for reason in run["finish_reasons"] if reason not in ("length", "failed"))
    short = asked * run["num_prompts"] - sum(min(n, asked) for n in ok)
    return {"failed": failed, "cut": cut, "short": short, "received": sum(lens), "asked": asked * run["num_prompts"]}


def main() -> None:
    from jarvis.backends.llama_cpp.engine import LlamaCppSettings
    from jarvis.settings import JarvisSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--prompts", type=int, default=16, help="requests per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and concurrency (median over them)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--n-ctx", type=int, default=JarvisSettings.model_fields["max_model_len"].default,
                        help="context tokens per sequence on all sides (default: JARVIS_MAX_MODEL_LEN's)")
    parser.add_argument("--n-batch", type=int, default=LlamaCppSettings.model_fields["n_batch"].default,
                        help="prompt tokens per decode call on all sides (default: JARVIS_LLAMA_N_BATCH's)")
    parser.add_argument("--peers", default=None,
                        help=f"comma-separated, of {','.join(PEERS)} (default: both; llama-server only where "
                             "its binary is built or --llama-server names one; named here, it is built if need be)")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help=f"llama-server binary (default: the one {BUILD_SCRIPT.name} built)")
    parser.add_argument("--jarvis-parallel", type=int,
                        default=int(os.environ.get("JARVIS_LLAMA_N_PARALLEL")
                                    or LlamaCppSettings.model_fields["n_parallel"].default),
                        help="JARVIS_LLAMA_N_PARALLEL of the Jarvis server: sequences it decodes at once "
                             "(default: the environment's JARVIS_LLAMA_N_PARALLEL, else the engine's default)")
    parser.add_argument("--server-parallel", type=int, default=None,
                        help="llama-server's --parallel slots (default: the highest --concurrency)")
    parser.add_argument("--peer-defaults", action="store_true",
                        help="run the peers with their own defaults: llama-cpp-python's logits_all and "
                             "interrupt_requests (true), llama-server's flash attention (auto) and SWA cache (small)")
    parser.add_argument("--out", type=Path, default=None, help="write every run's raw result to OUT/llama_peer.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    levels = [int(c) for c in args.concurrency.split(",")]
    server_parallel = args.server_parallel or max(levels)
    if args.peers is None:
        binary = find_llama_server(args.llama_server, build=False)
        peers = [p for p in PEERS if p != "llama-server" or binary is not None]
        if binary is None:
            print(f"llama-server: no binary (run {BUILD_SCRIPT} or pass --llama-server); measuring without it",
                  file=sys.stderr)
    else:
        peers = [p.strip() for p in args.peers.split(",") if p.strip()]
        if not peers or set(peers) - set(PEERS):
            parser.error(f"--peers: a comma-separated list of {', '.join(PEERS)}")
        binary = find_llama_server(args.llama_server, build=True) if "llama-server" in peers else None
    sides = ["jarvis", *peers]

    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.embedded_model import embedded_model_path
    from jarvis.settings import load_settings

    data_dir = load_settings().data_dir
    gguf, tokenizer = embedded_model_path(data_dir), embedded_hf_model(data_dir)
    eog = end_tokens(gguf)
    no_end = {"logit_bias": {str(t): -100 for t in eog}}
    # vLLM's client sends repetition_penalty 1.0, which the peers ignore: their own field is repeat_penalty
    # (llama-cpp-python's default 1.1: a different output and a penalty pass). Jarvis rejects unknown fields, so each
    # side gets its spelling. llama-server honours vLLM's ignore_eos (a -inf bias on the same end tokens).
    extra_body: dict[str, dict[str, Any]] = {"jarvis": no_end, "llama-cpp-python": {**no_end, "repeat_penalty": 1.0},
                                             "llama-server": {"repeat_penalty": 1.0}}
    server_command: list[str] | None = None
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        targets = {"jarvis": stack.enter_context(jarvis_server(
            JARVIS_INFERENCE_ENGINE="llama_cpp", JARVIS_LLAMA_N_PARALLEL=str(args.jarvis_parallel),
            JARVIS_LLAMA_N_THREADS=str(args.threads), JARVIS_MAX_MODEL_LEN=str(args.n_ctx),
            JARVIS_LLAMA_N_BATCH=str(args.n_batch), JARVIS_LLAMA_N_GPU_LAYERS="0")).removesuffix("/v1")}
        if "llama-cpp-python" in peers:
            targets["llama-cpp-python"] = stack.enter_context(llama_cpp_python_server(
                gguf, args.threads, args.n_ctx, args.n_batch, args.peer_defaults))
        if binary is not None:
            port = free_port()
            server_command = llama_server_command(binary, gguf, args.threads, args.n_ctx, args.n_batch,
                                                  server_parallel, args.peer_defaults, port)
            targets["llama-server"] = stack.enter_context(serving("llama-server", server_command, port, "/health"))
        for name in sides:  # warm-up
            vllm_bench(targets[name], tokenizer, 1, 2, args.input_len, 8, 0, extra_body[name], name)
        for li, level in enumerate(levels):
            for r in range(args.rounds):
                order = sides[r % len(sides):] + sides[:r % len(sides)]
                for name in order if r % 2 == 0 else order[::-1]:
                    print(f"concurrency {level}, round {r + 1}: {name}", file=sys.stderr)
                    runs.setdefault((name, level), []).append(
                        vllm_bench(targets[name], tokenizer, level, args.prompts, args.input_len, args.output_len,
                                   seed=1 + li * args.rounds + r, extra_body=extra_body[name], side=name))

    def med(name: str, level: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[(name, level)])

    def total(name: str, level: int, key: str) -> int:
        return sum(received(run, args.output_len)[key] for run in runs[(name, level)])

    def same_text(peer: str, level: int) -> tuple[int, int]:
        pairs = [(a, b) for ja, pa in zip(runs[("jarvis", level)], runs[(peer, level)], strict=True)
                 for a, b in zip(ja["generated_texts"], pa["generated_texts"], strict=True)]
        return sum(a == b for a, b in pairs), len(pairs)

    modes = {"llama-cpp-python": "logits_all, interrupt_requests true" if args.peer_defaults else
             "logits_all false, interrupt_requests false, 1 sequence at a time",
             "llama-server": f"--parallel {server_parallel}, ctx {server_parallel} x {args.n_ctx}, " +
             ("flash-attn auto, small SWA cache" if args.peer_defaults else "flash-attn off, --swa-full")}
    print(f"\nJarvis llama_cpp (parallel {args.jarvis_parallel}) vs "
          + "; ".join(f"{p} ({modes[p]})" for p in peers)
          + f"\n{args.threads} threads, n_ctx {args.n_ctx} per sequence, n_batch {args.n_batch}; {args.input_len} in / "
          f"{args.output_len} out (ignore_eos; EOG tokens {eog} biased -100 for jarvis and llama-cpp-python), "
          f"{args.prompts} prompts x {args.rounds} rounds; medians over rounds")
    print(f"{'conc':>4} {'peer':<16} {'tok/s j / p':>15} {'ratio':>6} {'TTFT p50 j / p ms':>18} "
          f"{'TPOT p50 j / p ms':>18} {'failed j/p':>10} {'cut j/p':>9} {'short j/p':>11} {'same text':>10}  flag")
    summary = []
    for level in levels:
        j = med("jarvis", level, "output_throughput")
        row: dict[str, Any] = {"concurrency": level, "jarvis_tok_s": j, "peers": {}}
        for peer in peers:
            pair = ("jarvis", peer)
            p = med(peer, level, "output_throughput")
            counts = {key: [total(n, level, key) for n in pair]
                      for key in ("failed", "cut", "short", "received", "asked")}
            same, pairs = same_text(peer, level)
            truncating = [n for i, n in enumerate(pair)
                          if counts["failed"][i] or counts["cut"][i] or counts["short"][i]]
            ttft = [med(n, level, "median_ttft_ms") for n in pair]
            tpot = [med(n, level, "median_tpot_ms") for n in pair]
            row["peers"][peer] = {"tok_s": p, "ratio": j / p, "ttft_p50_ms": ttft, "tpot_p50_ms": tpot, **counts,
                                  "same_text": [same, pairs], "truncated": truncating}
            flag = " ".join(f"TRUNC({n})" for n in truncating) or "-"
            print(f"{level:>4} {peer:<16} {j:>6.1f} / {p:<6.1f} {j / p:>6.2f} {ttft[0]:>8.0f} / {ttft[1]:<7.0f} "
                  f"{tpot[0]:>8.1f} / {tpot[1]:<7.1f} "
                  f"{counts['failed'][0]:>4} / {counts['failed'][1]:<3} {counts['cut'][0]:>3} / {counts['cut'][1]:<3} "
                  f"{counts['short'][0]:>4} / {counts['short'][1]:<4} {same:>4} / {pairs:<3}  {flag}")
        summary.append(row)
    print(json.dumps(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        raw = [{"side": name, "concurrency": level, "round": r + 1, **received(run, args.output_len), "result": run}
               for (name, level), rounds in runs.items() for r, run in enumerate(rounds)]
        (args.out / "llama_peer.json").write_text(json.dumps(
            {"config": {**config, "peers": peers, "server_parallel": server_parallel, "gguf": str(gguf),
                        "end_tokens": eog, "extra_body": extra_body, "llama_server_command": server_command},
             "summary": summary, "runs": raw}, indent=2, default=str))


if __name__ == "__main__":
    main()
