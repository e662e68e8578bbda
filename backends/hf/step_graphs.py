"""The static waves' decode step replayed as CUDA graphs captured with torch's own `torch.cuda.CUDAGraph`.

torch.compile's "reduce-overhead" mode replays CUDA graphs too, but through its graph-tree manager, which on
every call evaluates the compiled code's guards, checks the tree's invariants and copies each input that is
not already static: Python on the scheduler thread, holding the GIL, every step. On an H100 serving 64
streams of a 270M model that was 38 % of the scheduler's GIL time (py-spy), for a step the GPU runs in
2.3 ms. Here the step is compiled once without CUDA graphs (inductor's fused kernels), and captured by hand
for each (rows, window) shape over buffers of its own: a step copies its inputs (next tokens, positions,
the window's mask, each row's adapter slot; all on the device) into them and replays. No Python runs inside a replay.

What a graph reads and writes outside its buffers stays at one address: the wave's static KV cache (the
scheduler keeps one for its life), each layer's `cumulative_length` (updated in place), the adapters' stacks
(changed in place by a load or an unload that fits; a new stack makes a new StepGraphs). All graphs of one
StepGraphs share a memory pool, so they must not run at once and a step's logits are read before the next
step replays: the scheduler's one thread does both.

Without CUDA (a CPU) nothing is captured: the same forward runs on the same buffers every step, after the
same warm-up, so a CPU runs and checks everything here but the capture itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: Forward passes before a capture, on a side stream: the first compiles (for a new shape), the next one runs
#: what a capture must not do for the first time (lazy initialisation in cuBLAS and the like).
WARM_UP_RUNS = 2


@dataclass
class _Shape:
    """One captured step: its input buffers, its graph (None on a CPU) and the logits the graph writes."""

    ids: torch.Tensor  # rows × 1: each row's next input token
    positions: torch.Tensor  # rows × 1
    mask: torch.Tensor  # rows × window, contiguous: the window's part of the wave's attention mask
    adapter_rows: torch.Tensor | None  # rows: each row's slot in the adapters' stack (None: no adapters)
    graph: Any = None
    logits: torch.Tensor | None = None  # rows × vocab, written by each replay


class StepGraphs:
    """The decode step of one model (the base model, or the model with one adapters' stack) for every shape a
    static wave steps in, captured on its first use."""

    def __init__(self, forward: Callable[..., Any], cache: Any, stacked: Any = None) -> None:
        self.forward = forward  # the model's forward, compiled (torch.compile without CUDA graphs)
        self.cache = cache
        self.stacked = stacked
        self.captures = 0
        self._shapes: dict[tuple[int, int], _Shape] = {}
        self._pool: Any = None

    def step(self, feed: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, window: int,
             adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits (rows × vocab) of one step of len(feed) rows, each fed its token in `feed` (on
        the device): `mask` and `positions` are the wave's (rows × max_len, rows × 1), `adapter_rows` each row's
        stack slot when adapters are loaded."""
        rows = len(feed)
        key = (rows, window)
        shape = self._shapes.get(key)
        fresh = shape is None
        if shape is None:
            device = mask.device
            shape = _Shape(
                ids=torch.zeros((rows, 1), dtype=torch.long, device=device),
                positions=torch.zeros((rows, 1), dtype=positions.dtype, device=device),
                mask=torch.zeros((rows, window), dtype=mask.dtype, device=device),
                adapter_rows=None if self.stacked is None else torch.zeros(rows, dtype=torch.long, device=device))
        shape.ids.copy_(feed.unsqueeze(-1))
        shape.positions.copy_(positions[:rows])
        shape.mask.copy_(mask[:rows, :window])
        if shape.adapter_rows is not None:
            if adapter_rows is None:
                raise ValueError("a step of the adapters' stack needs each row's adapter slot")
            shape.adapter_rows.copy_(adapter_rows[:rows])
        if fresh:
            self._capture(shape)
            self._shapes[key] = shape  # only once captured: a failed capture is tried again, never run eager
        if shape.graph is None:  # no CUDA: the same forward, on the same buffers
            shape.logits = self._run(shape)
        else:
            shape.graph.replay()
        assert shape.logits is not None
        return shape.logits

    def _run(self, shape: _Shape) -> torch.Tensor:
        use = self.stacked.use(shape.adapter_rows) if self.stacked is not None else contextlib.nullcontext()
        with use:
            out = self.forward(input_ids=shape.ids, attention_mask=shape.mask, position_ids=shape.positions,
                               past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _capture(self, shape: _Shape) -> None:
        """Run the step WARM_UP_RUNS times (compiling it for this shape), undo what they did to the cache, and
        capture it. A run writes the step's keys and values at the cache's next slot and moves that slot on: the
        slot moves back, and what they wrote past it is overwritten by the step that reaches it before any mask
        shows it."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers if layer.is_initialized]
        cuda = shape.ids.is_cuda
        side = torch.cuda.Stream(device=shape.ids.device) if cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(shape.ids.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(WARM_UP_RUNS):
                self._run(shape)
        if side is not None:
            torch.cuda.current_stream(shape.ids.device).wait_stream(side)
        for layer, length in zip((layer for layer in self.cache.layers if layer.is_initialized), lengths):
            layer.cumulative_length.copy_(length)
        if not cuda:
            return
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (an embedding request, say) may run during the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            shape.logits = self._run(shape)
        shape.graph = graph
        self.captures += 1
