"""LoRA training speed: Jarvis's training loop against plain PEFT + `transformers.Trainer`.

In one run, on the same model, data (the same tokenized items in the same order),
LoRA config (r=8, alpha=16, q/k/v/o_proj, dropout 0), batch size, learning rate,
steps, seed and device, it trains
  * jarvis:  `plugins/training/trainer.train(...)` (logits only at loss positions),
  * trainer: `get_peft_model` + `transformers.Trainer` (the model's own forward with
             `labels`, i.e. logits over the whole 262k vocabulary at every position),
each in its own subprocess (`--only jarvis|trainer`) so that peak memory is its own.

How to read the table:
  * tok/s       input tokens (no padding) per second over the timed steps;
    loss tok/s  the same for tokens that carry loss (responses only);
  * s/step      median wall time between consecutive step ends, the first
                --warmup steps left out (data, forward, backward, optimizer, logging);
  * peak        CUDA: torch.cuda.max_memory_allocated (weights included);
                CPU: growth of peak RSS (ru_maxrss) over the loaded model + LoRA,
                so 0 means training stayed below what loading already peaked at;
  * loss        step 1 and last step mean token loss; step 1 should agree closely
                (same weights, same batch), later steps drift a little (different
                AdamW kernels, summation order); both are shown as measured;
  * ratio       jarvis tok/s / trainer tok/s (>1: Jarvis is faster).
Trainer runs with max_grad_norm=0 because Jarvis does not clip gradients.
`--pack K` joins K examples into one item (K times the tokens per step).
`--random-weights` builds a Gemma-3-270M-shaped model from bench/gemma3_270m_config.json
(the tokenizer is used if the converted folder exists, else random token ids).

    python bench/train_speed.py                      # CPU, fp32, 20 steps
    python bench/train_speed.py --device cuda --random-weights --steps 100 --pack 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from jarvis.plugins.training import trainer as jt
from jarvis.plugins.training.config import TrainConfig

HERE = Path(__file__).parent
DATA = HERE.parent / "tests" / "data" / "train_small.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def model_folder() -> Path:
    from jarvis.backends.hf_convert import embedded_hf_model
    from jarvis.settings import load_settings

    return embedded_hf_model(load_settings().data_dir)


def load_model(args: argparse.Namespace):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HERE / "gemma3_270m_config.json"),
                                                 dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_folder(), dtype=dtype)
    return model.to(args.device)


def load_items(args: argparse.Namespace) -> list[jt.Item]:
    """The dataset's (input_ids, labels), `--pack` examples per item, trimmed to whole batches."""
    from transformers import AutoTokenizer

    from jarvis.plugins.chat_formats.families import GEMMA
    from jarvis.plugins.training.datasets import prepare_dataset

    examples = prepare_dataset(DATA, GEMMA).examples
    if args.random_weights:
        from jarvis.backends.hf_convert import converted_dir
        from jarvis.settings import load_settings

        folder = converted_dir(load_settings().data_dir)
    else:
        folder = model_folder()
    if (folder / "tokenizer.json").is_file():
        items = jt.tokenize_examples(examples, AutoTokenizer.from_pretrained(folder), 512)
    else:  # no tokenizer here: random ids shaped like the real items (~16 prompt + ~3 response tokens)
        g = torch.Generator().manual_seed(1)
        items = []
        for _ in examples:
            p, r = int(torch.randint(14, 19, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
            ids = [2, *torch.randint(100, 200_000, (p + r - 1,), generator=g).tolist()]
            items.append((ids, [-100] * p + ids[p:]))
    packed = [(sum((ids for ids, _ in items[i:i + args.pack]), []), sum((lab for _, lab in items[i:i + args.pack]), []))
              for i in range(0, len(items) - args.pack + 1, args.pack)]
    return packed[:len(packed) - len(packed) % args.batch_size]


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(data=DATA, rank=8, alpha=16, dropout=0.0, target_modules=TARGETS, batch_size=args.batch_size,
                       learning_rate=args.lr, max_steps=args.steps, schedule="linear", warmup_steps=0,
                       eval_fraction=0.0, seed=args.seed, save_every=args.steps, tracker="none")


def run_jarvis(args, model, items, stamp) -> list[float]:
    config = train_config(args)
    model = jt.attach_lora(model, config)
    losses = []

    class PadOnly:
        pad_token_id = 0

    with tempfile.TemporaryDirectory() as out:
        jt.train(model, PadOnly(), items, [], config, Path(out), args.device,
                 on_step=lambda r: (losses.append(r.loss), stamp()))
    return losses


def run_trainer(args, model, items, stamp) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(args.seed)  # the same LoRA A matrices as jarvis's attach_lora
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    config = train_config(args)  # Jarvis's batch order, step by step, laid out for a sequential sampler
    order = [i for step in range(args.steps) for i in jt.micro_batches(len(items), config, step)[0]]
    dataset = [{"input_ids": items[i][0], "labels": items[i][1]} for i in order]

    def collator(features):
        width = max(len(f["input_ids"]) for f in features)
        pad = [width - len(f["input_ids"]) for f in features]
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * n for f, n in zip(features, pad)]),
                "labels": torch.tensor([f["labels"] + [-100] * n for f, n in zip(features, pad)]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * n for f, n in zip(features, pad)])}

    losses = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamp()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="linear", logging_steps=1, report_to=[], save_strategy="no",
            dataloader_num_workers=0, remove_unused_columns=False, seed=args.seed, max_grad_norm=0.0,
            train_sampling_strategy="sequential", use_cpu=args.device == "cpu", disable_tqdm=True)
        Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                callbacks=[Timer()]).train()
    return losses


def measure(args: argparse.Namespace) -> dict:
    """One path, in this process: its step times, losses and peak memory."""
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    items, model = load_items(args), load_model(args)
    config = train_config(args)
    steps = [[items[i] for i in jt.micro_batches(len(items), config, s)[0]] for s in range(args.steps)]
    tokens = [sum(len(ids) for ids, _ in b) for b in steps]
    loss_tokens = [sum(sum(x != -100 for x in lab[1:]) for _, lab in b) for b in steps]
    stamps: list[float] = []
    load_before = os.getloadavg()[0]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses = (run_jarvis if args.only == "jarvis" else run_trainer)(
        args, model, items, lambda: (sync(), stamps.append(time.perf_counter())))
    peak_mib = (torch.cuda.max_memory_allocated() if cuda else
                (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024) / 2**20
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]  # gap k ends step k + 2
    timed = slice(args.warmup, args.steps)
    return {"path": args.only, "steps": len(stamps), "seconds_per_step": statistics.median(gaps),
            "tokens_per_s": sum(tokens[timed]) / sum(gaps), "loss_tokens_per_s": sum(loss_tokens[timed]) / sum(gaps),
            "tokens_per_step": sum(tokens) / len(tokens), "loss_tokens_per_step": sum(loss_tokens) / len(tokens),
            "peak_mib": peak_mib, "peak_kind": "cuda max allocated" if cuda else "RSS growth",
            "first_loss": losses[0], "final_loss": losses[-1], "losses": losses, "items": len(items),
            "load_avg": [load_before, os.getloadavg()[0]], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="default: 20 on CPU, 100 on CUDA")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pack", type=int, default=1, help="examples joined into one training item")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--only", choices=["jarvis", "trainer"], help="run one path here, print its JSON line")
    parser.add_argument("--out", default=str(HERE / "results" / "train_speed.json"))
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.steps = args.steps or (100 if cuda else 20)
    if args.warmup < 1 or args.steps < args.warmup + 2:
        parser.error("need --warmup >= 1 and --steps >= warmup + 2")
    if args.only:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    rows = []
    for path in ("jarvis", "trainer"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", path,
               "--dtype", args.dtype, "--steps", str(args.steps)]
        print(f"running {path} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{path} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "jarvis_over_trainer_tokens_per_s": ratio}, indent=2))

    j = rows[0]
    where = torch.cuda.get_device_name() if cuda else f"CPU ({j['threads']} threads)"
    print(f"\nmodel: {'random-weight ' if args.random_weights else ''}Gemma-3-270M + LoRA r8 q/k/v/o, {args.dtype} on "
          f"{where}; {args.steps} steps "
          f"({args.warmup} warm-up not timed), batch {args.batch_size} x {j['items']} items, "
          f"{j['tokens_per_step']:.0f} tokens ({j['loss_tokens_per_step']:.0f} with loss) per step")
    print(f"load average (1 min) before/after: " + ", ".join(f"{r['path']} {r['load_avg'][0]:.1f}/{r['load_avg'][1]:.1f}"
                                                             for r in rows))
    print(f"{'path':8} {'tok/s':>9} {'loss tok/s':>11} {'s/step':>8} {'peak MiB':>9} {'loss step 1':>12} {'final loss':>11}")
    for r in rows:
        print(f"{r['path']:8} {r['tokens_per_s']:>9.1f} {r['loss_tokens_per_s']:>11.1f} {r['seconds_per_step']:>8.3f} "
              f"{r['peak_mib']:>9.0f} {r['first_loss']:>12.4f} {r['final_loss']:>11.4f}")
    print(f"jarvis / trainer tokens/s: {ratio:.2f}x   (peak = {j['peak_kind']})")


if __name__ == "__main__":
    main()
