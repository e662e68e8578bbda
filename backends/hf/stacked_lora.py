"""Per-row LoRA adapters for a mixed batch: two batched matmuls per layer, however many adapters the batch names.

PEFT serves a batch whose rows name different adapters (`adapter_names=`) by looping, in every LoRA layer,
over the adapters present: it picks each adapter's rows, runs that adapter's A and B on them and adds the
result back. That is a pair of small matmuls and two index copies per adapter per layer, so a decode step of
a 4-adapter batch is thousands of small kernels: launch-bound on a GPU, and it grows with every adapter.

`StackedLora` stacks every loaded adapter's matrices per layer once (each adapter's rank padded to the
largest, its scaling folded into B, slot 0 all zeros for rows of the base model). A forward gathers each
row's A and B by its slot and applies them with two `torch.bmm`: PEFT's own LoRA layers stay switched off
while a stack is built (`disable_adapter_layers()`, once, not per forward: PEFT's `disable_adapter()` context
walks every module twice) and a forward hook on each LoRA layer adds the stacked update to the base layer's
output. Outside `use` the hooks add nothing, so the model is then the base model. The result is PEFT's up
to float rounding (the scaling is applied to B, not to the product).

Only plain LoRA on linear layers stacks. A model with another kind (DoRA or another LoRA variant, LoRA on
embeddings or convolutions) gets `None` from `build`, and the caller keeps PEFT's routing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class StackedLora:
    def __init__(self, model: Any, names: list[str]) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.slots = {BASE: 0, **{name: i + 1 for i, name in enumerate(names)}}
        self.rows: torch.Tensor | None = None  # each row's slot, set for one forward by `use`
        self._hooks: list[Any] = []

    @classmethod
    def build(cls, model: Any) -> StackedLora | None:
        """The stacks of every LoRA layer of this PEFT model, its hooks registered; None if a layer cannot stack."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        names = list(model.peft_config)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if not layers or any(type(m) is not LoraLinear or m.lora_variant or m.lora_embedding_A for m in layers):
            return None
        stacked = cls(model, names)
        for layer in layers:
            stacked._hooks.append(layer.register_forward_hook(stacked._hook(*stacked._stack(layer, names))))
        model.base_model.disable_adapter_layers()
        return stacked

    def _stack(self, layer: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[slots, in, rank] and [slots, rank, out]: each adapter's A and scaled B, transposed for `bmm`."""
        present = [n for n in names if n in layer.lora_A]
        rank = max(layer.lora_A[n].weight.shape[0] for n in present) if present else 1
        weight = layer.lora_A[present[0]].weight if present else layer.base_layer.weight
        a = weight.new_zeros((len(names) + 1, layer.in_features, rank))
        b = weight.new_zeros((len(names) + 1, rank, layer.out_features))
        with torch.no_grad():
            for name in present:
                slot, down, up = self.slots[name], layer.lora_A[name].weight, layer.lora_B[name].weight
                a[slot, :, :down.shape[0]] = down.t()
                b[slot, :up.shape[1], :] = (up * layer.scaling[name]).t()
        return a, b

    def _hook(self, a: torch.Tensor, b: torch.Tensor) -> Any:
        def add_update(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            rows = self.rows
            if rows is None:
                return output
            x = args[0]
            flat = x.dim() == 2  # [batch, in] rather than [batch, tokens, in]
            x = (x.unsqueeze(1) if flat else x).to(a.dtype)
            update = torch.bmm(torch.bmm(x, a[rows]), b[rows])
            return output + (update.squeeze(1) if flat else update).to(output.dtype)
        return add_update

    def rows_of(self, adapters: Sequence[str]) -> torch.Tensor:
        """Each row's slot in the stacks, on the model's device (KeyError: an adapter not in this stack)."""
        return torch.tensor([self.slots[a] for a in adapters], device=self.device)

    @contextlib.contextmanager
    def use(self, adapters: Sequence[str] | torch.Tensor) -> Iterator[None]:
        """One forward of the model with row i through adapter `adapters[i]` (BASE: none), or through the slot
        `adapters[i]` when given as a tensor (a static decode keeps one, changed in place as rows change, so a
        replayed CUDA graph reads each row's adapter from the same address)."""
        self.rows = adapters if isinstance(adapters, torch.Tensor) else self.rows_of(adapters)
        try:
            yield
        finally:
            self.rows = None

    def close(self) -> None:
        """Remove the hooks and give the rows back to PEFT's own LoRA layers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.model.base_model.enable_adapter_layers()
