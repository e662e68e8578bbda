"""Per-row LoRA adapters for a mixed batch: two matmuls per layer, however many adapters the batch names.

PEFT serves a batch whose rows name different adapters (`adapter_names=`) by looping, in every LoRA layer,
over the adapters present: it picks each adapter's rows, runs that adapter's A and B on them and adds the
result back. That is a pair of small matmuls and two index copies per adapter per layer, so a decode step of
a 4-adapter batch is thousands of small kernels: launch-bound on a GPU, and it grows with every adapter.

`StackedLora` stacks every loaded adapter's matrices per layer, side by side: one [in, slots x rank] A and one
[slots x rank, out] B (each adapter's rank padded to the stack's, its scaling folded into B). A forward runs x
@ A for every slot at once, zeroes each row's columns of the slots it does not use (a 0/1 mask made once per
forward from each row's slot; a row of the base model keeps none) and multiplies by B: two matmuls per layer
whatever the mix, each stack read once per step. (Gathering each row's own A and B and `bmm` over the rows
reads a stack once per row: 2-3.6x slower per layer on CPU at 8-64 rows.) PEFT's own LoRA layers stay switched
off while a stack is built (`disable_adapter_layers()`, once, not per forward: PEFT's `disable_adapter()`
context walks every module twice) and a forward hook on each LoRA layer adds the stacked update to the base
layer's output. Outside `use` the hooks add nothing, so the model is then the base model. The result is PEFT's
up to float rounding (the scaling is applied to B, not to the product).

The stacks are slots, as vLLM's LoRA has them: `build` may reserve more than the loaded adapters need, and
after a load or an unload `refresh` writes the change into the same tensors (an unloaded adapter's slot is
zeroed and freed, a new one takes a free slot; the others keep theirs). The tensors then never move, so a
step compiled into a CUDA graph with the hooks inside stays valid across loads; `refresh` says False when the
change does not fit (a rank above the stack's, more adapters than slots, other layers), and the caller
builds a new stack, which a compiled step must be compiled again for.

Only plain LoRA on linear layers stacks. A model with another kind (DoRA or another LoRA variant, LoRA on
embeddings or convolutions) gets `None` from `build`, and the caller keeps PEFT's routing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _lora_layers(model: Any) -> list[Any] | None:
    """The model's LoRA layers, or None if one of them cannot stack (or there are none)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(type(m) is not LoraLinear or m.lora_variant or m.lora_embedding_A for m in layers):
        return None
    return layers


def _rank(layers: list[Any]) -> int:
    return max((layer.lora_A[n].weight.shape[0] for layer in layers for n in layer.lora_A), default=1)


class StackedLora:
    def __init__(self, model: Any, layers: list[Any], capacity: int, rank: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.capacity = capacity  # adapter slots, besides slot 0 (the base model)
        self.rank = rank
        self.slots: dict[str, int] = {BASE: 0}
        #: Counts the changes `refresh` made in place: a holder of rows (`rows_of`) computes them again.
        self.generation = 0
        #: [rows, slots x rank]: 1 where a row's adapter has its columns, set for one forward by `use`
        self.mask: torch.Tensor | None = None
        self._layers = layers
        self._stacks: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: The slot each column of A (and row of B) belongs to.
        self._column_slots = torch.arange(1, capacity + 1, device=self.device).repeat_interleave(rank)
        self._hooks: list[Any] = []

    @classmethod
    def build(cls, model: Any, slots: int = 0) -> StackedLora | None:
        """The stacks of every LoRA layer of this PEFT model, its hooks registered, with room for at least
        `slots` adapters (and for every loaded one) at the largest loaded rank; None if a layer cannot stack."""
        layers = _lora_layers(model)
        if layers is None:
            return None
        stacked = cls(model, layers, max(slots, len(model.peft_config)), _rank(layers))
        static = stacked.device.type == "cuda"
        width = stacked.capacity * stacked.rank
        for layer in layers:
            weight = layer.base_layer.weight
            dtype = next((layer.lora_A[n].weight.dtype for n in layer.lora_A), weight.dtype)
            a = torch.zeros((layer.in_features, width), dtype=dtype, device=weight.device)
            b = torch.zeros((width, layer.out_features), dtype=dtype, device=weight.device)
            if static:  # a CUDA graph reads them from their address, their contents changed in place
                torch._dynamo.mark_static_address(a)
                torch._dynamo.mark_static_address(b)
            stacked._stacks.append((a, b))
            stacked._hooks.append(layer.register_forward_hook(stacked._hook(a, b)))
        stacked._fill()
        return stacked

    def refresh(self) -> bool:
        """After a load or an unload: write the change into the stacks in place. False (nothing changed) if it
        does not fit them: then build a new stack."""
        layers = _lora_layers(self.model)
        if (layers is None or len(layers) != len(self._layers) or any(x is not y for x, y in zip(layers, self._layers))
                or _rank(layers) > self.rank or len(self.model.peft_config) > self.capacity):
            return False
        self._fill()
        self.generation += 1
        return True

    def _fill(self) -> None:
        """Free the slots of adapters no longer loaded, give each new one a free slot and write its matrices:
        A transposed, B scaled and transposed, zero beyond its rank."""
        names = list(self.model.peft_config)
        gone = [slot for name, slot in self.slots.items() if name != BASE and name not in names]
        self.slots = {name: slot for name, slot in self.slots.items() if name == BASE or name in names}
        free = sorted(set(range(1, self.capacity + 1)) - set(self.slots.values()))
        new = [name for name in names if name not in self.slots]
        self.slots.update(zip(new, free))
        with torch.no_grad():
            for layer, views in zip(self._layers, self._stacks):
                for slot in gone:
                    for view in self.columns(views, slot):
                        view.zero_()
                for name in new:  # its slot is zero: never used, or zeroed when freed
                    a, b = self.columns(views, self.slots[name])
                    if name in layer.lora_A:
                        down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
                        a[:, :down.shape[0]] = down.t()
                        b[:up.shape[1], :] = (up * layer.scaling[name]).t()
        self.model.base_model.disable_adapter_layers()  # a load may have switched PEFT's layers on again

    def columns(self, stack: tuple[torch.Tensor, torch.Tensor], slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's part of a layer's stack (views): its columns of A, its rows of B."""
        a, b = stack
        at = (slot - 1) * self.rank  # slot 0, the base model, has none
        return a[:, at:at + self.rank], b[at:at + self.rank]

    def _hook(self, a: torch.Tensor, b: torch.Tensor) -> Any:
        def add_update(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            mask = self.mask
            if mask is None:
                return output
            x = args[0]
            keep = mask if x.dim() == 2 else mask.unsqueeze(1)  # [batch, in] or [batch, tokens, in]
            return output + (((x.to(a.dtype) @ a) * keep) @ b).to(output.dtype)
        return add_update

    def rows_of(self, adapters: Sequence[str]) -> torch.Tensor:
        """Each row's slot in the stacks, on the model's device (KeyError: an adapter not in this stack)."""
        return torch.tensor([self.slots[a] for a in adapters], device=self.device)

    @contextlib.contextmanager
    def use(self, adapters: Sequence[str] | torch.Tensor) -> Iterator[None]:
        """One forward of the model with row i through adapter `adapters[i]` (BASE: none), or through the slot
        `adapters[i]` when given as a tensor (a static decode keeps one, changed in place as rows change, so a
        replayed CUDA graph reads each row's adapter from the same address)."""
        rows = adapters if isinstance(adapters, torch.Tensor) else self.rows_of(adapters)
        # a comparison, not one_hot: on CUDA one_hot checks its input's range on the host, a sync per step
        self.mask = (rows.unsqueeze(1) == self._column_slots).to(self._stacks[0][0].dtype)
        try:
            yield
        finally:
            self.mask = None

    def close(self) -> None:
        """Remove the hooks and give the rows back to PEFT's own LoRA layers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.model.base_model.enable_adapter_layers()
