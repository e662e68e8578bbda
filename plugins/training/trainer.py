"""LoRA / DoRA / QLoRA fine-tuning with PEFT: the loop, checkpoints, resume, evaluation.

Only adapter weights train; the base stays frozen. The loss is the mean over
response tokens of a whole optimizer step: each micro-batch contributes its
summed token loss divided by the step's token count, so k accumulated
micro-batches give the same update as one batch k times larger. Logits are
computed only at the positions that carry loss, which keeps a 262k-word
vocabulary affordable on a CPU.

Batches follow a seeded order fixed by (seed, epoch), so step N always sees
the same data: a checkpoint stores the adapter, the optimizer, the schedule
and the step, and `--resume` continues the same run exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jarvis.errors import ConfigError
from jarvis.plugins.training.config import TrainConfig
from jarvis.plugins.training.datasets import IGNORE_INDEX, Example, tokenize_example

Item = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens: int
    seconds: float


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_tokens: int
    seconds: float
    resumed_from: int | None = None


def load_base(config: TrainConfig, folder: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantization = None
    if config.qlora:
        if not device.startswith("cuda"):
            raise ConfigError("--qlora", True, "QLoRA quantizes the base to 4-bit NF4 with bitsandbytes, which "
                              "needs a CUDA GPU", "drop --qlora to train plain LoRA here, or run on a CUDA host")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ConfigError("--qlora", True, "bitsandbytes is not installed",
                              "pip install bitsandbytes, or drop --qlora") from None
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization,
                                                 device_map=device if quantization else None)
    if quantization is None:
        model.to(device)
    return model, tokenizer


def attach_lora(model: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(config.seed)  # LoRA's A matrices start random: the seed makes a run repeatable
    return get_peft_model(model, LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=config.target_modules, use_dora=config.dora, task_type="CAUSAL_LM"))


def tokenize_examples(examples: list[Example], tokenizer: Any, max_length: int) -> list[Item]:
    def tokenize(text: str, add_special: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=add_special)["input_ids"]

    items = [tokenize_example(e, tokenize, max_length) for e in examples]
    return [item for item in items if item is not None]


def collate(items: list[Item], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    ids = [i + [pad_id] * (width - len(i)) for i, _ in items]
    labels = [lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in items]
    mask = [[1] * len(i) + [0] * (width - len(i)) for i, _ in items]
    return {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device)}


def summed_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over label positions, with logits computed only there."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    if logits.dtype in (torch.float16, torch.bfloat16):  # a stable loss from half-precision logits;
        logits = logits.float()  # never `.float()` on float64, which would round the loss to float32
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


def micro_batches(n_items: int, config: TrainConfig, step: int) -> list[list[int]]:
    """The item indices of each micro-batch of optimizer step `step` (0-based), fixed by the seed."""
    per_epoch = math.ceil(n_items / config.batch_size)
    out = []
    for k in range(config.grad_accum):
        index = step * config.grad_accum + k
        epoch, position = divmod(index, per_epoch)
        order = list(range(n_items))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[position * config.batch_size:(position + 1) * config.batch_size])
    return out


def total_steps(n_items: int, config: TrainConfig) -> int:
    if config.max_steps:
        return config.max_steps
    per_epoch = math.ceil(n_items / config.batch_size)
    return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(config.schedule, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=steps)


def optimizer_step(model: Any, optimizer: torch.optim.Optimizer,
                   batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """One update from several micro-batches; returns (mean token loss, tokens)."""
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    total = max(1, sum(counts))
    loss_sum = 0.0
    for batch in batches:
        loss, _ = summed_token_loss(model, batch)
        (loss / total).backward()
        loss_sum += float(loss.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / total, total


@torch.no_grad()
def evaluate(model: Any, items: list[Item], pad_id: int, device: str, batch_size: int) -> float | None:
    if not items:
        return None
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        loss, n = summed_token_loss(model, collate(items[start:start + batch_size], pad_id, device))
        loss_sum, tokens = loss_sum + float(loss), tokens + n
    model.train(was_training)
    return loss_sum / max(1, tokens)


# --- checkpoints ------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_checkpoint(model: Any, optimizer: Any, schedule: Any, output_dir: Path, step: int,
                    losses: list[float]) -> Path:
    folder = output_dir / "checkpoints" / f"step-{step}"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, partial / "trainer.pt")
    (partial / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # a checkpoint exists whole or not at all
    return folder


def load_checkpoint(model: Any, optimizer: Any, schedule: Any, folder: Path) -> tuple[int, list[float]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    state = torch.load(folder / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    meta = json.loads((folder / "state.json").read_text())
    return int(meta["step"]), list(meta["losses"])


# --- the loop ---------------------------------------------------------------------------------------


def train(model: Any, tokenizer: Any, train_items: list[Item], eval_items: list[Item], config: TrainConfig,
          output_dir: Path, device: str, *, resume: bool = False,
          on_step: Callable[[StepReport], None] = lambda r: None,
          on_checkpoint: Callable[[Path, int], None] = lambda p, s: None,
          on_eval: Callable[[int, float], None] = lambda s, v: None) -> TrainResult:
    if not train_items:
        raise ConfigError("--data", str(config.data), "no usable training examples",
                          "fix the dataset (see `jarvis data check`)")
    torch.manual_seed(config.seed)
    steps = total_steps(len(train_items), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    schedule = make_schedule(optimizer, config, steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start, losses, resumed_from = 0, [], None
    if resume and (found := checkpoint_dirs(output_dir)):
        start, losses = load_checkpoint(model, optimizer, schedule, found[-1])
        resumed_from = start
    eval_before = evaluate(model, eval_items, pad_id, device, config.batch_size) if start == 0 else None
    model.train()
    started, tokens_seen = time.monotonic(), 0
    for step in range(start, steps):
        t0 = time.monotonic()
        batches = [collate([train_items[i] for i in idx], pad_id, device)
                   for idx in micro_batches(len(train_items), config, step) if idx]
        loss, tokens = optimizer_step(model, optimizer, batches)
        schedule.step()
        losses.append(loss)
        tokens_seen += tokens
        on_step(StepReport(step + 1, steps, loss, schedule.get_last_lr()[0], tokens, time.monotonic() - t0))
        if (step + 1) % config.save_every == 0 and step + 1 < steps:
            on_checkpoint(save_checkpoint(model, optimizer, schedule, output_dir, step + 1, losses), step + 1)
    eval_after = evaluate(model, eval_items, pad_id, device, config.batch_size)
    if eval_after is not None:
        on_eval(steps, eval_after)
    model.save_pretrained(output_dir)
    if config.qlora:  # the adapter was trained against a 4-bit base: say so beside it
        quantization = getattr(model.config, "quantization_config", None)
        (output_dir / "quantization_config.json").write_text(json.dumps(
            quantization.to_dict() if hasattr(quantization, "to_dict") else {"load_in_4bit": True,
                                                                            "bnb_4bit_quant_type": "nf4"},
            indent=2, default=str))
    (output_dir / "training.json").write_text(json.dumps({"config": json.loads(config.model_dump_json()),
                                                          "losses": losses}, indent=2))
    return TrainResult(str(output_dir), steps, losses[0] if losses else None, losses[-1] if losses else None,
                       eval_before, eval_after, tokens_seen, time.monotonic() - started, resumed_from)
