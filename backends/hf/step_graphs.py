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

The prompts' forward pass (a wave's first requests, each join) is replayed the same way (PrefillGraphs), eager
rather than compiled, one graph per padded (rows, width) shape.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("jarvis.backends.hf.step_graphs")

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


#: The narrowest width (tokens) a prefill graph pads its prompts to; widths double from here.
MIN_PREFILL_WIDTH = 32


def padded_width(width: int) -> int:
    """The width a prefill graph pads `width` prompt tokens to: the next power of two, at least MIN_PREFILL_WIDTH."""
    return max(MIN_PREFILL_WIDTH, 1 << (width - 1).bit_length())


def padded_rows(rows: int) -> int:
    """The rows of the prefill graph that computes `rows` prompts: the next power of two."""
    return 1 << (rows - 1).bit_length()


#: The most tokens (rows × width) one prefill graph computes (a 32 × 256 graph of the 270M model holds about
#: 180 MB): more rows go in pieces of that many tokens, one replay each; a wider prompt runs eager.
PREFILL_GRAPH_TOKENS = 8192
#: The most device memory the captured prefills' outputs (each graph's keys, values and logits) may hold
#: together; once they hold it, a prefill of a shape not yet captured runs eager.
PREFILL_GRAPH_BYTES = 2 << 30


@dataclass
class _Prefill:
    """One captured prefill: its input buffers (rows × width, the prompts left-padded), its graph (None on a CPU),
    and what each replay writes: the last position's logits and every layer's keys and values."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    adapter_rows: torch.Tensor | None
    graph: Any = None
    logits: torch.Tensor | None = None  # rows × vocab
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # each layer's keys, values: rows × heads × slots × d


class PrefillGraphs:
    """The prompts' forward pass of a static wave (its first requests, and each join) replayed as a CUDA graph,
    one per (rows, width) shape, both rounded up to a power of two, captured on the shape's first use (or at
    start: warm(), the shapes a server's last run used).

    Eager, that pass is launch-bound for a small model: on an H100 a join of a few 256-token prompts through the
    270M model launched its kernels one by one for tens of milliseconds, while every decoding row waited. The
    prompts are left-padded to the shape's width (the padding masked, as a wave's prefill pads to its longest
    prompt), and the rows past theirs are stand-ins that see one slot. Unlike the decode step, nothing is compiled:
    eager transformers runs once to warm up, and once more under capture, into a cache made for that run (the
    keys and values it returns stay in the graph's memory, rewritten by each replay, so a caller copies what it
    needs before the next prefill). The graphs share one memory pool: one prefill at a time. A prefill of more
    rows than the token limit lets a graph hold (a join of 64 long prompts) is replayed in pieces.

    A shape whose capture fails (an operation a capture does not allow, in some model's forward) runs eager
    from then on, with a warning. Without CUDA (a CPU) nothing is captured: the same forward runs on the same
    padded buffers.
    """

    def __init__(self, forward: Callable[..., Any], config: Any, dtype: torch.dtype, stacked: Any = None,
                 base_slot: int = 0, max_tokens: int = PREFILL_GRAPH_TOKENS,
                 max_bytes: int = PREFILL_GRAPH_BYTES) -> None:
        self.forward = forward  # the model's eager forward
        self.config = config
        self.dtype = dtype  # the keys' and values'
        self.stacked = stacked
        self.base_slot = base_slot  # the stand-in rows' slot in the adapters' stack
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes
        self.captures = 0
        self.held_bytes = 0  # what the captured graphs' outputs hold
        self._shapes: dict[tuple[int, int], _Prefill] = {}
        self._eager: set[tuple[int, int]] = set()  # shapes whose capture failed: they run eager
        self._pool: Any = None

    def shape(self, rows: int, width: int) -> tuple[int, int] | None:
        """The (rows, width) graph that computes `rows` prompts left-padded to `width`, None if it runs eager."""
        shape = (padded_rows(rows), padded_width(width))
        if shape[0] * shape[1] > self.max_tokens or shape in self._eager:
            return None
        if shape not in self._shapes and self.held_bytes >= self.max_bytes:
            return None
        return shape

    def shapes(self) -> list[tuple[int, int]]:
        """The shapes that have a graph (on a CPU: their buffers), in the order they were first used."""
        return list(self._shapes)

    def warm(self, shapes: list[tuple[int, int]], device: torch.device, token: int) -> int:
        """Capture `shapes` now, before any request needs them (the shapes a server's last run used): a prefill of
        `token` repeated in each, skipping a shape that is not a graph's (rows and width rounded) or has none
        (past the token limit, the memory full). Returns how many shapes it added (on a CPU: their buffers, their
        forward run once). Base model only."""
        if self.stacked is not None:
            raise ValueError("warm() captures the base model's prefills; the adapters' stack changes with its loads")
        done = 0
        for rows, width in shapes:
            if (rows, width) in self._shapes or self.shape(rows, width) != (rows, width):
                continue
            ids = torch.full((rows, width), token, dtype=torch.long, device=device)
            positions = torch.arange(width, dtype=torch.long, device=device).expand(rows, width)
            if self.prefill(ids, torch.ones_like(ids), positions) is not None:
                done += 1
        return done

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                adapter_rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The last position's logits (rows × vocab) and each layer's keys and values (rows × heads × slots × d,
        the last slots holding the prompts) of `ids` (rows × width, left-padded, with its `mask` and
        `positions`): views of the graph's outputs, valid until the next prefill (rows over the token limit go
        in pieces, copied out). None: this shape runs eager."""
        rows, width = ids.shape
        key = self.shape(rows, width)
        if key is None:
            return self._in_pieces(ids, mask, positions, adapter_rows)
        p = self._shapes.get(key)
        fresh = p is None
        if p is None:
            device = ids.device
            p = _Prefill(ids=torch.zeros(key, dtype=ids.dtype, device=device),
                         mask=torch.zeros(key, dtype=mask.dtype, device=device),
                         positions=torch.zeros(key, dtype=positions.dtype, device=device),
                         adapter_rows=None if self.stacked is None else
                         torch.full((key[0],), self.base_slot, dtype=torch.long, device=device))
        pad = key[1] - width  # the prompts end at the buffers' last column
        p.ids.zero_()
        p.ids[:rows, pad:] = ids
        p.mask.zero_()
        p.mask[:rows, pad:] = mask
        p.mask[rows:, -1] = 1  # a stand-in row sees one slot: an all-masked row would turn its garbage NaN
        p.positions.zero_()
        p.positions[:rows, pad:] = positions
        if p.adapter_rows is not None:
            if adapter_rows is None:
                raise ValueError("a prefill of the adapters' stack needs each row's adapter slot")
            p.adapter_rows.fill_(self.base_slot)
            p.adapter_rows[:rows] = adapter_rows
        if fresh:
            try:
                self._capture(p)
            except Exception:  # the prefill is still served, eager; its shape is not captured again
                log.warning("the prefill of %d rows x %d tokens could not be captured as a CUDA graph; it runs "
                            "eager", *key, exc_info=True)
                self._eager.add(key)
                return None
            self._shapes[key] = p
        if p.graph is None:  # no CUDA: the same forward, on the same buffers
            p.logits, p.layers = self._run(p)
        else:
            p.graph.replay()
        assert p.logits is not None and p.layers is not None
        return p.logits[:rows], [(k[:rows], v[:rows]) for k, v in p.layers]

    def _in_pieces(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   adapter_rows: torch.Tensor | None
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """More rows than one graph of their width may hold (the token limit): the rows in pieces of the most a
        graph holds, each replayed and copied out before the next, so a join of 64 long prompts is two or four
        replays instead of one eager pass. Rows are independent in a prefill: the pieces' outputs, joined, are
        the whole prefill's. None (eager) if a piece's shape has no graph."""
        rows, width = ids.shape
        padded = padded_width(width)
        if padded > self.max_tokens:
            return None
        piece = 1 << ((self.max_tokens // padded).bit_length() - 1)
        starts = range(0, rows, piece)
        if piece >= rows or any(self.shape(min(piece, rows - start), width) is None for start in starts):
            return None
        logits: torch.Tensor | None = None
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start in starts:
            part = slice(start, start + piece)
            done = self.prefill(ids[part], mask[part], positions[part],
                                None if adapter_rows is None else adapter_rows[part])
            if done is None:  # its capture failed, or the graphs' memory filled, just now
                return None
            if logits is None:  # the outputs, shaped as one piece's but with every row
                logits = done[0].new_empty((rows, *done[0].shape[1:]))
                layers = [(k.new_empty((rows, *k.shape[1:])), v.new_empty((rows, *v.shape[1:])))
                          for k, v in done[1]]
            logits[part].copy_(done[0])
            for (keys, values), (k, v) in zip(layers, done[1], strict=True):
                keys[part].copy_(k)
                values[part].copy_(v)
        return logits, layers

    def _cache(self, p: _Prefill) -> Any:
        """A cache for one run, every layer initialised with no slots yet: outside a capture, since a sliding
        layer's initialisation copies a tensor of its own to the device, which a capture must not do."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        text = self.config.get_text_config()
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        empty = torch.empty((p.ids.shape[0], text.num_key_value_heads, 0, head), dtype=self.dtype,
                            device=p.ids.device)
        for layer in cache.layers:
            layer.update(empty, empty)
        return cache

    def _run(self, p: _Prefill, cache: Any = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        cache = self._cache(p) if cache is None else cache
        use = self.stacked.use(p.adapter_rows) if self.stacked is not None else contextlib.nullcontext()
        with use:
            out = self.forward(input_ids=p.ids, attention_mask=p.mask, position_ids=p.positions,
                               past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], [(layer.keys, layer.values) for layer in cache.layers]

    def _capture(self, p: _Prefill) -> None:
        """Run the prefill once on a side stream (what a capture must not do for the first time, such as lazy
        initialisation in cuBLAS), then capture it."""
        if not p.ids.is_cuda:
            return
        device = p.ids.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._run(p)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        cache = self._cache(p)
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            p.logits, p.layers = self._run(p, cache)
        p.graph = graph
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (p.logits, *(t for pair in p.layers for t in pair))}
        self.held_bytes += sum(storages.values())
        self.captures += 1

