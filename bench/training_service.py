"""What does the Tinker API cost? A training step and a sampled token through the service vs without it.

One run measures two things side by side on the embedded gemma-3-270m (trainer: PEFT LoRA in fp32 on
CPU, on the model converted to transformers; sampler: the llama.cpp serving engine):

  train   the same fixed batch (--batch sequences of --seq-len random token ids within the vocabulary,
          seeded), the same LoRA (--rank, alpha = rank, dropout 0, attention + MLP projections, no
          lm_head) and the same AdamW (lr 1e-4, the SDK's AdamParams defaults), one step =
          forward_backward(cross_entropy) + optim_step:
            api   the official `tinker` SDK against `python -m jarvis serve` (a subprocess), both requests
                  sent, then both results awaited (`.result()`) before the next step;
            bare  the plain PEFT loop in this process: forward with the attention mask, log_softmax,
                  gather the targets, weighted sum, backward, AdamW step, zero_grad: the trainer's math
                  (plugins/tinker/trainer.py) without the service around it.
          Both use the torch thread count a fresh process gets (the server's; printed). After 2 warm-up
          steps each, the paths take turns in blocks of 2 steps (the order flips every turn), so load
          that comes and goes falls on both. The first warm-up losses must agree (LoRA B starts at zero:
          both compute the base model's loss). overhead ms = API step time - bare step time:
          HTTP, the SDK, the service's futures, and the trainer's own way of doing the math.
  sample  the same token-id prompt and sampling params (--samples completions of --max-tokens tokens,
          temperature 1, end of sequence ignored, sampled tokens' logprobs on) on the same server:
            tinker  `SamplingClient.sample` (stop=[] turns every stop off);
            v1      POST /v1/completions with `n`, `ignore_eos` and `logprobs: 0` (httpx).
          One warm-up each, then --rounds rounds, alternating; generated tokens per second.

Reading the tables: api/bare = API steps/s over bare steps/s (goal >= 0.9x), tinker/v1 = tokens/s ratio
(goal >= 0.95x); each from totals, from medians, and for training from the best step of each path. On a
shared machine bursts of background load slow single steps several-fold: the medians, the paired median
(the median of api step k - bare step k, run a block apart) and the best steps resist them, totals do
not. "first loss" is loss:sum of each path's first step. Raw times go to DIR/training_service.json.
  loop    then one turn of the RL loop on the API's trained weights: save_weights_and_get_sampling_client
          (the time to publish them to the serving engine hot), --samples seeded samples, and the trainer's
          forward on the same tokens: |sampled - trained| logprob per token (mean, max).

Defaults (4×32 tokens, 20 steps; 8×32 sampled tokens, 8 rounds) take 2-4 minutes on 2 CPU cores.

    python bench/training_service.py [--steps N] [--batch B] [--seq-len L] [--rank R]
                                     [--samples S] [--max-tokens M] [--rounds K] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import tinker
import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from tinker import types
from transformers import AutoConfig, AutoModelForCausalLM

from jarvis.backends.model_tools.convert import embedded_hf_model
from jarvis.settings import load_settings

sys.path.insert(0, str(Path(__file__).parent))
from jarvis_process import jarvis_server  # noqa: E402

MODEL = "gemma-3-270m"
KEY = "tml-bench"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAM = types.AdamParams(learning_rate=1e-4)  # beta1 0.9, beta2 0.95, eps 1e-12, no weight decay, no clipping
WARMUP = 2  # training steps per path before timing
BLOCK = 2  # training steps per turn
PROMPT_LEN = 16

Run = dict[str, list[tuple[float, float]]]  # "warmup" / "timed": (seconds, value) per call


def fixed_batch(vocab: int, batch: int, seq_len: int) -> list[list[int]]:
    """`batch` sequences of seq_len + 1 ids (inputs are [:-1], targets [1:]), the same every run."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len + 1), generator=g).tolist()


def default_torch_threads() -> int:
    """torch's thread count in a fresh process with this environment: what the server's trainer uses."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


class BareTrainer:
    """The trainer's math in this process: PEFT LoRA + AdamW on one fixed batch."""

    def __init__(self, folder: Path, rank: int, sequences: list[list[int]], device: str = "cpu") -> None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16  # as the trainer: fp32 on CPU, bf16 on CUDA
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        base.eval()  # as the trainer: no dropout
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        self.model = get_peft_model(base, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=ADAM.learning_rate, betas=(ADAM.beta1, ADAM.beta2),
                                           eps=ADAM.eps, weight_decay=ADAM.weight_decay)
        batch = torch.tensor(sequences, device=device)
        self.ids, self.targets = batch[:, :-1], batch[:, 1:]
        self.mask = torch.ones_like(self.ids)
        self.weights = torch.ones(self.ids.shape, dtype=torch.float32, device=device)
        self.device = device

    def step(self) -> float:
        logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target_logprobs = logprobs.gather(-1, self.targets[..., None]).squeeze(-1)
        loss = -(target_logprobs * self.weights).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())  # waits for the GPU, as the API's result does
        return value


class ApiTrainer:
    """The same step through the Tinker API with the official SDK."""

    def __init__(self, service: tinker.ServiceClient, rank: int, sequences: list[list[int]]) -> None:
        self.client = service.create_lora_training_client(base_model=MODEL, rank=rank, seed=0,
                                                          train_unembed=False).result()
        self.data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                                 loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)})
                     for s in sequences]

    def step(self) -> float:
        backward = self.client.forward_backward(self.data, "cross_entropy")
        optim = self.client.optim_step(ADAM)
        loss = backward.result().metrics["loss:sum"]
        optim.result()
        return float(loss)


def alternate(paths: dict[str, Callable[[], float]], warmup: int, count: int, block: int) -> dict[str, Run]:
    """`warmup` calls of each path, then `count` timed calls of each, taking turns `block` calls at a time
    (the order flips every turn): (seconds, returned value) per call."""
    runs: dict[str, Run] = {name: {"warmup": [], "timed": []} for name in paths}

    def call(name: str, phase: str) -> None:
        start = time.perf_counter()
        value = paths[name]()
        runs[name][phase].append((time.perf_counter() - start, value))

    for name in paths:
        for _ in range(warmup):
            call(name, "warmup")
    done = 0
    while done < count:
        n = min(block, count - done)
        order = list(paths) if (done // block) % 2 == 0 else list(paths)[::-1]
        for name in order:
            for _ in range(n):
                call(name, "timed")
        done += n
    return runs


def summarize_training(runs: dict[str, Run]) -> dict[str, dict[str, float]]:
    """Per path: steps/s over all timed steps, median and best step; for api, its ratios to bare and its
    overhead per step (mean, median of paired steps, best vs best)."""
    out = {}
    for name, run in runs.items():
        seconds = [s for s, _ in run["timed"]]
        out[name] = {"steps_per_s": len(seconds) / sum(seconds), "mean_s": statistics.fmean(seconds),
                     "median_s": statistics.median(seconds), "best_s": min(seconds),
                     "first_loss": run["warmup"][0][1]}
    api, bare = out["api"], out["bare"]
    pairs = [a - b for (a, _), (b, _) in zip(runs["api"]["timed"], runs["bare"]["timed"])]
    api.update(ratio=api["steps_per_s"] / bare["steps_per_s"], ratio_median=bare["median_s"] / api["median_s"],
               ratio_best=bare["best_s"] / api["best_s"], overhead_ms=(api["mean_s"] - bare["mean_s"]) * 1e3,
               overhead_paired_median_ms=statistics.median(pairs) * 1e3,
               overhead_best_ms=(api["best_s"] - bare["best_s"]) * 1e3)
    return out


def fresh_weights_loop(training: tinker.TrainingClient, prompt: list[int], samples: int,
                       max_tokens: int) -> dict[str, float]:
    """One turn of the RL loop on the weights just trained: publish them to the serving engine, sample
    `samples` continuations of `prompt` (temperature 1, seeded), score the same tokens with the trainer's
    forward, and compare the two logprobs per sampled token (on-policy RL needs them equal)."""
    start = time.perf_counter()
    sampler = training.save_weights_and_get_sampling_client().result()
    publish_s = time.perf_counter() - start
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=7, stop=[])
    sequences = sampler.sample(types.ModelInput.from_ints(prompt), samples, params).result().sequences
    data = [types.Datum(model_input=types.ModelInput.from_ints((prompt + s.tokens)[:-1]),
                        loss_fn_inputs={"target_tokens": (prompt + s.tokens)[1:],
                                        "weights": [0.0] * (len(prompt) + len(s.tokens) - 1)}) for s in sequences]
    scored = training.forward(data, "cross_entropy").result().loss_fn_outputs
    gaps = torch.cat([(torch.tensor(out["logprobs"].to_numpy()[len(prompt) - 1:]) - torch.tensor(s.logprobs)).abs()
                      for out, s in zip(scored, sequences)])
    return {"publish_s": publish_s, "tokens": float(gaps.numel()), "gap_mean": float(gaps.mean()),
            "gap_max": float(gaps.max())}


def summarize_sampling(runs: dict[str, Run]) -> dict[str, dict[str, float]]:
    out = {}
    for name, run in runs.items():
        seconds, tokens = [s for s, _ in run["timed"]], [t for _, t in run["timed"]]
        out[name] = {"tokens_per_s": sum(tokens) / sum(seconds),
                     "median_tokens_per_s": statistics.median(t / s for s, t in run["timed"]),
                     "median_round_s": statistics.median(seconds), "tokens_per_round": statistics.fmean(tokens)}
    tinker_path, v1 = out["tinker"], out["v1"]
    tinker_path.update(ratio=tinker_path["tokens_per_s"] / v1["tokens_per_s"],
                       ratio_median=tinker_path["median_tokens_per_s"] / v1["median_tokens_per_s"])
    return out


def sampling_paths(service: tinker.ServiceClient, http: httpx.Client, prompt: list[int], samples: int,
                   max_tokens: int) -> dict[str, Callable[[], float]]:
    """Each path: one round of `samples` completions of `prompt`; returns the tokens generated."""
    sampler = service.create_sampling_client(base_model=MODEL).result()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    body = {"model": MODEL, "prompt": prompt, "n": samples, "max_tokens": max_tokens, "temperature": 1.0,
            "ignore_eos": True, "logprobs": 0}

    def via_tinker() -> float:
        result = sampler.sample(types.ModelInput.from_ints(prompt), samples, params).result()
        return float(sum(len(s.tokens) for s in result.sequences))

    def via_v1() -> float:
        response = http.post("/completions", json=body)
        response.raise_for_status()
        return float(response.json()["usage"]["completion_tokens"])

    return {"tinker": via_tinker, "v1": via_v1}


def print_tables(console: Console, args: argparse.Namespace, config: dict[str, Any],
                 training: dict[str, dict[str, float]], sampling: dict[str, dict[str, float]]) -> None:
    table = Table(title=f"Training step: forward_backward(cross_entropy) + optim_step — batch {args.batch}×"
                        f"{args.seq_len} tokens, LoRA r={args.rank} (attn+MLP), {args.steps} steps after "
                        f"{WARMUP} warm-up, torch threads {config['torch_threads']}")
    for column in ("path", "steps/s", "median s", "best s", "api/bare", "(median)", "(best)", "overhead ms",
                   "(paired median)", "(best)", "first loss"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, label in (("api", "api: tinker SDK → jarvis serve"), ("bare", "bare: PEFT in process")):
        s = training[name]
        api = name == "api"
        cells = [f"{s['ratio']:.3f}x", f"{s['ratio_median']:.3f}x", f"{s['ratio_best']:.3f}x",
                 f"{s['overhead_ms']:+.0f}", f"{s['overhead_paired_median_ms']:+.0f}",
                 f"{s['overhead_best_ms']:+.0f}"] if api else ["—"] * 6
        table.add_row(label, f"{s['steps_per_s']:.3f}", f"{s['median_s']:.3f}", f"{s['best_s']:.3f}", *cells,
                      f"{s['first_loss']:.2f}")
    console.print(table)

    table = Table(title=f"Sampling: {args.samples} samples × {args.max_tokens} tokens, temperature 1, ignore EOS, "
                        f"{PROMPT_LEN}-token prompt, {args.rounds} rounds, engine {args.engine}"
                        + (f" (n_parallel {config['llama_n_parallel']})" if args.engine == "llama_cpp" else ""))
    for column in ("path", "tok/s", "median tok/s", "median s/round", "tokens/round", "tinker/v1",
                   "tinker/v1 (median)"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, label in (("tinker", "tinker: SamplingClient.sample"), ("v1", "v1: /v1/completions")):
        s = sampling[name]
        first = name == "tinker"
        table.add_row(label, f"{s['tokens_per_s']:.1f}", f"{s['median_tokens_per_s']:.1f}",
                      f"{s['median_round_s']:.3f}", f"{s['tokens_per_round']:.0f}",
                      f"{s['ratio']:.3f}x" if first else "—", f"{s['ratio_median']:.3f}x" if first else "—")
    console.print(table)
    expected = args.samples * args.max_tokens
    if any(sampling[name]["tokens_per_round"] != expected for name in sampling):
        console.print(f"[yellow]A round generated fewer than {expected} tokens: a stop was not turned off.")
    console.print(f"Load average before/after: {config['load_before']:.2f} / {config['load_after']:.2f} on "
                  f"{config['cpu_count']} cores.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per path")
    parser.add_argument("--batch", type=int, default=4, help="sequences per training step")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    parser.add_argument("--samples", type=int, default=8, help="completions per sampling round")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--rounds", type=int, default=8, help="timed sampling rounds per path")
    parser.add_argument("--engine", default="llama_cpp", help="the serving engine that samples (llama_cpp, hf, vllm)")
    parser.add_argument("--model", type=Path, help="a transformers folder to serve and train (default: the "
                                                     "embedded model; llama_cpp serves its GGUF)")
    parser.add_argument("--device", default="cpu", help="where the bare loop trains: cpu or cuda (the server's "
                                                        "trainer follows JARVIS_DEVICE=auto)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                        help="vllm: the serving engine's share of the GPU (the rest is the trainers')")
    parser.add_argument("--ready-timeout", type=float, default=180, help="seconds to wait for the server")
    parser.add_argument("--out", type=Path, default=Path("jarvis-reports"))
    args = parser.parse_args()
    console = Console(width=max(Console().width, 150))

    data_dir = load_settings().data_dir
    folder = args.model.resolve() if args.model else embedded_hf_model(data_dir)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    sequences = fixed_batch(vocab, args.batch, args.seq_len)
    prompt = torch.randint(1000, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    threads = default_torch_threads()
    torch.set_num_threads(threads)
    n_parallel = max(1, min(args.samples, os.cpu_count() or 1))
    config: dict[str, Any] = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "warmup": WARMUP, "block": BLOCK, "torch_threads": threads, "vocab": vocab,
                              "llama_n_parallel": n_parallel, "cpu_count": os.cpu_count(),
                              "load_before": os.getloadavg()[0]}
    console.print(f"torch threads: {threads} (a fresh process's default, the server's) in both paths")
    settings = {"JARVIS_DATA_DIR": str(data_dir), "JARVIS_API_KEYS": KEY, "JARVIS_LLAMA_N_PARALLEL": str(n_parallel),
                "JARVIS_MAX_MODEL_LEN": str(max(512, args.seq_len + 1, PROMPT_LEN + args.max_tokens)),
                "JARVIS_INFERENCE_ENGINE": args.engine}
    if args.engine == "vllm":
        settings["JARVIS_VLLM_GPU_MEMORY_UTILIZATION"] = str(args.gpu_memory_utilization)
    if args.model:
        settings.update(JARVIS_MODEL_NAME=str(folder), JARVIS_TINKER_BASE_MODEL=str(folder),
                        JARVIS_SERVED_MODEL_NAME=MODEL)
    config.update(engine=args.engine, device=args.device, model=str(folder))

    with jarvis_server(args.ready_timeout, **settings) as v1_url:
        service = tinker.ServiceClient(base_url=v1_url.removesuffix("/v1"), api_key=KEY)
        try:
            with console.status("loading the bare model and the API's training client ..."):
                bare = BareTrainer(folder, args.rank, sequences, args.device)
                api = ApiTrainer(service, args.rank, sequences)
            with console.status(f"training: {args.steps} steps per path, alternating ..."):
                train_runs = alternate({"api": api.step, "bare": bare.step}, WARMUP, args.steps, BLOCK)
            del bare
            with console.status("the loop: publish the trained weights, sample, score with forward ..."):
                loop = fresh_weights_loop(api.client, prompt, args.samples, args.max_tokens)
            with console.status(f"sampling: {args.rounds} rounds per path, alternating ..."), \
                    httpx.Client(base_url=v1_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as http:
                paths = sampling_paths(service, http, prompt, args.samples, args.max_tokens)
                sample_runs = alternate(paths, 1, args.rounds, 1)
        finally:
            service.close("success")
    config["load_after"] = os.getloadavg()[0]

    training, sampling = summarize_training(train_runs), summarize_sampling(sample_runs)
    print_tables(console, args, config, training, sampling)
    console.print(f"Fresh weights ({args.engine} samples, the trainer scores): published in {loop['publish_s']:.2f} s; "
                  f"|sampled - trained| logprob over {loop['tokens']:.0f} tokens: mean {loop['gap_mean']:.2e}, "
                  f"max {loop['gap_max']:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "training_service.json"
    out.write_text(json.dumps({"config": config, "training": {"summary": training, "runs": train_runs},
                               "sampling": {"summary": sampling, "runs": sample_runs},
                               "fresh_weights": loop}, indent=2))
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
