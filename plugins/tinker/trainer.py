"""The trainer: the served base model in transformers, with one PEFT LoRA adapter per training model.

The base loads once (on the first `create_model`) from the served model's transformers folder; each
training model is a named LoRA adapter on it with its own AdamW optimizer, so several training clients
train at once on one copy of the base. All torch work runs on the trainer's one thread (the event loop
keeps serving); adapters take turns. `forward_backward` adds to the adapter's gradients (accumulation
across calls), `optim_step` applies them with the request's Adam parameters and clears them. Weights and
optimizer state save to a folder (a PEFT adapter folder, plus `optimizer.pt`) that the serving engine
loads as it is and that `load` restores exactly.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from jarvis.plugins.tinker.futures import RequestFailed

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("jarvis.tinker")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
UNEMBED = ["lm_head"]


@dataclass
class LoraSpec:
    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    def target_modules(self) -> list[str]:
        return [*(ATTENTION if self.train_attn else []), *(MLP if self.train_mlp else []),
                *(UNEMBED if self.train_unembed else [])]

    def public(self) -> dict[str, Any]:
        return {"rank": self.rank, "seed": self.seed, "train_attn": self.train_attn, "train_mlp": self.train_mlp,
                "train_unembed": self.train_unembed}


@dataclass
class Datum:
    tokens: list[int]  # the model input (the chunks' tokens, in order)
    inputs: dict[str, np.ndarray]  # loss_fn_inputs


@dataclass
class TrainingModel:
    model_id: str
    adapter: str  # the PEFT adapter name inside the trainer's model
    lora: LoraSpec
    optimizer: Any = None
    params: list[Any] = field(default_factory=list)
    pending_backward: int = 0  # forward_backward calls since the last optim_step


def padded(rows: list[Any], lengths: list[int], dtype: type, device: Any) -> Any:
    """Rows of these lengths as one zero-padded [len(rows), max(lengths)] tensor on `device` (one copy)."""
    import torch

    out: np.ndarray = np.zeros((len(rows), max(lengths)), dtype=dtype)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        out[i, :n] = row
    return torch.from_numpy(out).to(device)


def adapter_name(model_id: str) -> str:
    return "m" + hashlib.sha256(model_id.encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, find_folder: Callable[[], Path], device: str, dtype_setting: str, max_model_len: int) -> None:
        self._find_folder = find_folder  # may convert the served model on first use: call it on the trainer's thread
        self._folder: Path | None = None
        self.device_setting = device
        self.dtype_setting = dtype_setting
        self.max_model_len = max_model_len
        self.models: dict[str, TrainingModel] = {}
        self._peft: Any = None
        self._spare: str | None = None
        self._vocab = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinker-trainer")
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        """The transformers folder the base loads from."""
        if self._folder is None:
            self._folder = self._find_folder()
        return self._folder

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn` on the trainer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # --- models ------------------------------------------------------------------------------------

    def _base(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        from jarvis.backends.model_tools.devices import resolve_device, resolve_dtype

        device = resolve_device(self.device_setting)
        dtype = resolve_dtype(self.dtype_setting, device)
        if device == "cpu":
            dtype = torch.float32  # exact gradients and logprobs on CPU; bf16 on CUDA
        log.info("tinker trainer: loading %s on %s (%s)", self.folder, device, dtype)
        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).to(device)
        model.eval()  # no dropout: a step's loss is a function of the weights
        self._vocab = model.get_output_embeddings().weight.shape[0]
        return model

    def create(self, model_id: str, lora: LoraSpec) -> TrainingModel:
        """A new LoRA adapter on the base (loaded on first use) with its optimizer."""
        import torch
        from peft import LoraConfig, get_peft_model

        if lora.rank < 1:
            raise RequestFailed(f"lora_config.rank must be at least 1, got {lora.rank}.")
        config = LoraConfig(r=lora.rank, lora_alpha=lora.rank, lora_dropout=0.0,
                            target_modules=lora.target_modules(), task_type="CAUSAL_LM")
        name = adapter_name(model_id)
        if lora.seed is not None:
            torch.manual_seed(lora.seed)
        if self._peft is None:
            self._peft = get_peft_model(self._base(), config, adapter_name=name)
        else:
            self._peft.add_adapter(name, config)
            if self._spare is not None:  # the adapter of a freed model, kept while it was the only one
                self._peft.delete_adapter(self._spare)
                self._spare = None
        model = TrainingModel(model_id, name, lora)
        model.params = [p for n, p in self._peft.named_parameters() if f".{name}." in n]
        for p in model.params:
            p.requires_grad_(True)
        model.optimizer = torch.optim.AdamW(model.params, lr=1e-4)
        self.models[model_id] = model
        return model

    def drop(self, model_id: str) -> None:
        """Free a training model: its adapter and its optimizer state."""
        model = self.models.pop(model_id, None)
        if model is None or self._peft is None:
            return
        model.optimizer = None
        model.params = []
        if self.models:  # PEFT keeps at least one adapter: the last one stays, unused, until the next create
            self._peft.delete_adapter(model.adapter)
        else:
            self._spare = model.adapter

    def vocab_size(self) -> int:
        return self._vocab

    # --- training ----------------------------------------------------------------------------------

    def check_data(self, data: list[Datum], loss_fn: str, config: dict[str, float]) -> None:
        from jarvis.plugins.tinker import losses  # torch, like every import of it here: at the first request

        if not data:
            raise RequestFailed("forward_backward needs at least one datum.")
        for i, datum in enumerate(data):
            if not datum.tokens:
                raise RequestFailed(f"data[{i}].model_input has no tokens.")
            if len(datum.tokens) > self.max_model_len:
                raise RequestFailed(f"data[{i}] has {len(datum.tokens)} tokens; the model's context is "
                                    f"{self.max_model_len} (JARVIS_MAX_MODEL_LEN).")
            bad = [t for t in datum.tokens if not 0 <= t < self._vocab]
            if bad:
                raise RequestFailed(f"data[{i}].model_input holds token id {bad[0]}, outside the vocabulary "
                                    f"(0..{self._vocab - 1}).")
            try:
                losses.check_loss(loss_fn, datum.inputs, config, len(datum.tokens))
            except losses.LossInputError as exc:
                raise RequestFailed(f"data[{i}]: {exc}") from None
            targets = datum.inputs["target_tokens"]
            if targets.size and (targets.min() < 0 or targets.max() >= self._vocab):
                raise RequestFailed(f"data[{i}].loss_fn_inputs.target_tokens holds an id outside the vocabulary "
                                    f"(0..{self._vocab - 1}).")

    def forward_backward(self, model_id: str, data: list[Datum], loss_fn: str, config: dict[str, float],
                         forward_only: bool) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
        """Per datum: the target tokens' logprobs and the elementwise loss; metrics `loss:sum`. Adds the
        loss's gradients to the adapter's unless `forward_only`."""
        import torch

        from jarvis.plugins.tinker import losses

        model = self.models[model_id]
        self.check_data(data, loss_fn, config)
        peft = self._peft
        peft.set_adapter(model.adapter)
        for p in model.params:  # set_adapter leaves only the active adapter trainable
            p.requires_grad_(True)
        device = next(peft.parameters()).device
        lengths = [len(d.tokens) for d in data]
        ids = padded([d.tokens for d in data], lengths, np.int64, device)
        mask = padded([np.ones(n) for n in lengths], lengths, np.float32, device)
        targets = padded([d.inputs["target_tokens"] for d in data], lengths, np.int64, device)
        # every datum's inputs as one padded [batch, width] tensor per key; only `weights` is optional (default 1)
        inputs = {key: padded([d.inputs[key] if key in d.inputs else np.ones(n) for d, n in zip(data, lengths)],
                              lengths, np.float32, device)
                  for key in dict.fromkeys(k for d in data for k in d.inputs if k != "target_tokens")}
        with torch.set_grad_enabled(not forward_only):
            logits = peft(input_ids=ids, attention_mask=mask.long()).logits.float()
            # log p(target) = logit(target) - logsumexp(logits), and the loss, for the whole batch at once: one
            # backward and one copy to the host, however many data (padding masked out of the loss)
            every_target = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            elementwise = losses.datum_loss(loss_fn, every_target, inputs, config) * mask
            total = elementwise.sum()
            if not forward_only:
                total.backward()
                model.pending_backward += 1
        logprobs, losses = every_target.detach().cpu().numpy(), elementwise.detach().cpu().numpy()
        outputs = [{"logprobs": logprobs[i, :n], "elementwise_loss": losses[i, :n]} for i, n in enumerate(lengths)]
        return outputs, {"loss:sum": float(total.detach())}

    def optim_step(self, model_id: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                   grad_clip_norm: float) -> dict[str, float]:
        import torch

        model = self.models[model_id]
        grads = [p for p in model.params if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(grads, grad_clip_norm if grad_clip_norm > 0 else float("inf"))
                     ) if grads else 0.0
        for group in model.optimizer.param_groups:
            group.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        model.optimizer.step()
        model.optimizer.zero_grad(set_to_none=True)
        accumulated, model.pending_backward = model.pending_backward, 0
        return {"grad_norm": norm, "forward_backward_calls": float(accumulated)}

    # --- weights -----------------------------------------------------------------------------------

    def save(self, model_id: str, folder: Path, with_optimizer: bool) -> None:
        """The adapter as a PEFT folder (what engines load), plus the optimizer state when asked."""
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        model = self.models[model_id]
        folder.mkdir(parents=True, exist_ok=True)
        config = self._peft.peft_config[model.adapter]
        config.base_model_name_or_path = str(self.folder)
        config.save_pretrained(str(folder))
        # the LoRA matrices only: a tied lm_head would otherwise bring the whole embedding along
        state = get_peft_model_state_dict(self._peft, adapter_name=model.adapter, save_embedding_layers=False)
        weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(weights, str(folder / "adapter_model.safetensors"))
        (folder / "tinker_lora.json").write_text(json.dumps(model.lora.public()))
        if with_optimizer:
            torch.save(model.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, model_id: str, folder: Path, with_optimizer: bool) -> TrainingModel:
        """Restore a saved adapter (and optimizer) into `model_id`, created here if it is new."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        spec = LoraSpec(**json.loads((folder / "tinker_lora.json").read_text()))
        model = self.models.get(model_id)
        if model is None:
            model = self.create(model_id, spec)
        elif model.lora.public() != spec.public():
            raise RequestFailed(f"The checkpoint's LoRA ({spec.public()}) differs from this model's "
                                f"({model.lora.public()}).")
        set_peft_model_state_dict(self._peft, load_file(str(folder / "adapter_model.safetensors")),
                                  adapter_name=model.adapter)
        if with_optimizer:
            optimizer_file = folder / "optimizer.pt"
            if not optimizer_file.is_file():
                raise RequestFailed("This checkpoint has no optimizer state (it was saved for a sampler); load it "
                                    "without the optimizer.")
            model.optimizer.load_state_dict(torch.load(optimizer_file, weights_only=True))
        for p in model.params:
            p.grad = None
        model.pending_backward = 0
        return model
