"""LoRA training speed: Jarvis's training loop against plain PEFT + `transformers.Trainer`.

On the same model, data (same tokenized items, same order), LoRA config (r=8, alpha=16,
q/k/v/o_proj, dropout 0), batch size, learning rate, steps, seed and device it trains
  * jarvis:  `plugins/training/trainer.train(...)` (logits only at loss positions),
  * trainer: `get_peft_model` + `transformers.Trainer` (the model's forward with `labels`:
             logits over the whole 262k vocabulary at every position),
each in its own subprocess (`--only jarvis|trainer`), so each peak memory is its own.

Reading the table:
  * tok/s, loss tok/s  input tokens (no padding), and tokens that carry loss, per second
                       over the timed steps (all but the first --warmup);
  * s/step      median wall time between consecutive step ends (data, forward, backward,
                optimizer, logging), warm-up steps left out;
  * peak MiB    CUDA: torch.cuda.max_memory_allocated (weights included); CPU: growth of
                peak RSS (ru_maxrss; high-water mark reset after loading) over the loaded model;
  * loss        mean token loss of step 1 and of the last step, as measured: step 1 should
                agree closely (same weights and batch), later steps may drift slightly
                (AdamW kernels, summation order);
  * ratio       jarvis tok/s / trainer tok/s (>1: Jarvis is faster).
Trainer runs with max_grad_norm=0 because Jarvis does not clip gradients. `--pack K` joins
K examples into one item (K times the tokens per step). `--random-weights` builds a
Gemma-3-270M-shaped model from bench/gemma3_270m_config.json (the tokenizer is used if the
converted folder exists, else random ids shaped like the real items).

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
from types import SimpleNamespace

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from jarvis.backends.model_tools.convert import converted_dir, embedded_hf_model
from jarvis.plugins.chat_formats.families import GEMMA
from jarvis.plugins.training import trainer as jt
from jarvis.plugins.training.config import TrainConfig
from jarvis.plugins.training.datasets import prepare_dataset
from jarvis.settings import load_settings

HERE = Path(__file__).parent
DATA = HERE.parent / "tests" / "data" / "train_small.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_model(args: argparse.Namespace):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HERE / "gemma3_270m_config.json"),
                                                 dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(embedded_hf_model(load_settings().data_dir), dtype=dtype)
    model.to(args.device)
    for param in model.parameters():  # fault in memory-mapped weights now, so RSS growth is training's own
        param.detach().sum()
    return model


def load_items(args: argparse.Namespace) -> list[jt.Item]:
    """(input_ids, labels) of the dataset, `--pack` examples per item, trimmed to whole batches."""
    examples = prepare_dataset(DATA, GEMMA).examples
    data_dir = load_settings().data_dir
    folder = converted_dir(data_dir) if args.random_weights else embedded_hf_model(data_dir)
    if (folder / "tokenizer.json").is_file():
        items = jt.tokenize_examples(examples, AutoTokenizer.from_pretrained(folder), 512)
    else:  # no tokenizer here: random ids shaped like the real items (16 prompt + 3 response tokens)
        g = torch.Generator().manual_seed(1)
        items = [(ids, [-100] * 16 + ids[16:]) for ids in torch.randint(100, 200_000, (len(examples), 19),
                                                                         generator=g).tolist()]
    groups = [items[i:i + args.pack] for i in range(0, len(items) - args.pack + 1, args.pack)]
    packed = [(sum((ids for ids, _ in g), []), sum((lab for _, lab in g), [])) for g in groups]
    return packed[:len(packed) - len(packed) % args.batch_size]


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(data=DATA, rank=8, alpha=16, dropout=0.0, target_modules=TARGETS, batch_size=args.batch_size,
                       learning_rate=args.lr, max_steps=args.steps, schedule="linear", warmup_steps=0,
                       eval_fraction=0.0, seed=args.seed, save_every=args.steps, tracker="none")


def run_jarvis(args, model, items, stamp) -> list[float]:
    config = train_config(args)
    model = jt.attach_lora(model, config)
    losses = []
    with tempfile.TemporaryDirectory() as out:  # no eval items: train() evaluates nothing; pad id 0 as Gemma's
        jt.train(model, SimpleNamespace(pad_token_id=0), items, [], config, Path(out), args.device,
                 on_step=lambda r: (losses.append(r.loss), stamp()))
    return losses


def run_trainer(args, model, items, stamp) -> list[float]:
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

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamp()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="linear", logging_steps=1, report_to=[], save_strategy="no",
            dataloader_num_workers=0, remove_unused_columns=False, seed=args.seed, max_grad_norm=0.0,
            train_sampling_strategy="sequential", use_cpu=args.device == "cpu", disable_tqdm=True)
        run = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator, callbacks=[Timer()])
        run.train()
    return [float(h["loss"]) for h in run.state.log_history if "loss" in h]


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
    try:  # Linux: reset the RSS high-water mark, so that loading's transient peak cannot hide training's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses = (run_jarvis if args.only == "jarvis" else run_trainer)(
        args, model, items, lambda: (sync(), stamps.append(time.perf_counter())))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = (torch.cuda.max_memory_allocated() if cuda else (rss_after - rss_before) * 1024) / 2**20
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]  # gap k ends step k + 2
    timed = slice(args.warmup, args.steps)
    return {"path": args.only, "steps": len(stamps), "seconds_per_step": statistics.median(gaps),
            "tokens_per_s": sum(tokens[timed]) / sum(gaps), "loss_tokens_per_s": sum(loss_tokens[timed]) / sum(gaps),
            "tokens_per_step": sum(tokens) / len(tokens), "loss_tokens_per_step": sum(loss_tokens) / len(tokens),
            "peak_mib": peak_mib, "peak_kind": "cuda max allocated" if cuda else "RSS growth",
            "peak_rss_mib": rss_after / 1024, "first_loss": losses[0], "final_loss": losses[-1], "losses": losses,
            "items": len(items), "load_avg": [load_before, os.getloadavg()[0]], "threads": torch.get_num_threads()}


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
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", path]
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
    print(f"\nmodel: {'random-weight ' * args.random_weights}Gemma-3-270M + LoRA r8 q/k/v/o, {args.dtype} on {where};"
          f" {args.steps} steps ({args.warmup} warm-up not timed), batch {args.batch_size} of {j['items']} items,"
          f" {j['tokens_per_step']:.0f} tokens ({j['loss_tokens_per_step']:.0f} with loss) per step")
    loads = ", ".join(f"{r['path']} {r['load_avg'][0]:.1f} -> {r['load_avg'][1]:.1f}" for r in rows)
    print(f"load average (1 min), start -> end: {loads}")
    print(f"{'path':8} {'tok/s':>9} {'loss tok/s':>11} {'s/step':>8} {'peak MiB':>9} {'loss step 1':>12} "
          f"{'final loss':>11}")
    for r in rows:
        print(f"{r['path']:8} {r['tokens_per_s']:>9.1f} {r['loss_tokens_per_s']:>11.1f} {r['seconds_per_step']:>8.3f} "
              f"{r['peak_mib']:>9.0f} {r['first_loss']:>12.4f} {r['final_loss']:>11.4f}")
    print(f"jarvis / trainer tokens/s: {ratio:.2f}x   (peak = {j['peak_kind']})")


if __name__ == "__main__":
    main()
