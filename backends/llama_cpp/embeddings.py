"""Embeddings on llama.cpp: a context of its own in embedding mode, beside the generation pool.

The context is made on first use over the same GGUF (memory-mapped: the weights are shared with the
generation contexts, not loaded twice), with llama.cpp's mean pooling (`LLAMA_POOLING_TYPE_MEAN`: the
mean of the final hidden state, after the output norm, over each sequence's tokens). Several inputs go
into one `llama_decode` as separate sequences, up to `n_batch` tokens (the context window, so any input
that fits the window fits a batch) and `n_seq_max` sequences; each sequence's pooled vector is then
L2-normalised here. The work runs on one thread of its own (a llama.cpp context is not thread-safe), so
it never holds the event loop or a generation context.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def pack_batches(lengths: list[int], max_tokens: int, max_sequences: int) -> list[list[int]]:
    """Input indices grouped into decode batches of at most `max_tokens` tokens and `max_sequences` inputs,
    in input order (every length must be ≤ max_tokens)."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index, n in enumerate(lengths):
        if current and (tokens + n > max_tokens or len(current) >= max_sequences):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += n
    if current:
        batches.append(current)
    return batches


class LlamaEmbedder:
    """One embedding-mode llama.cpp context over `path`, made on first use; `embed` runs on its own thread."""

    def __init__(self, path: Path, n_ctx: int, threads: int, n_gpu_layers: int) -> None:
        self.path, self.n_ctx, self.threads, self.n_gpu_layers = path, n_ctx, threads, n_gpu_layers
        self._llm: Any = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llama-embed")
        self._lock = threading.Lock()
        self.decodes = 0
        self.dimensions: int | None = None

    def _context(self) -> Any:
        if self._llm is None:
            import llama_cpp

            # flash attention: without it, a sequence's vector depends on the sequences packed after it in the
            # batch (cosine 0.9994 to its vector alone, measured on the embedded model); with it, 0.99999+
            self._llm = llama_cpp.Llama(str(self.path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                                        n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                                        n_threads=self.threads, n_threads_batch=self.threads, flash_attn=True,
                                        n_gpu_layers=self.n_gpu_layers, verbose=False)
            self.dimensions = self._llm.n_embd()
        return self._llm

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.embed_now, token_ids)

    def embed_now(self, token_ids: list[list[int]]) -> list[list[float]]:
        """The unit vectors of `token_ids` (each ≤ n_ctx tokens), in order; blocks."""
        import llama_cpp

        with self._lock:
            llm = self._context()
            n_embd = llm.n_embd()
            out = np.empty((len(token_ids), n_embd), dtype=np.float32)
            max_sequences = max(1, int(llm.context_params.n_seq_max))
            batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
            try:
                for group in pack_batches([len(t) for t in token_ids], self.n_ctx, max_sequences):
                    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
                    n = 0
                    for seq, index in enumerate(group):
                        for pos, token in enumerate(token_ids[index]):
                            batch.token[n], batch.pos[n] = token, pos
                            batch.n_seq_id[n], batch.seq_id[n][0], batch.logits[n] = 1, seq, 1
                            n += 1
                    batch.n_tokens = n
                    if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                        raise RuntimeError("llama_decode failed while embedding")
                    self.decodes += 1
                    for seq, index in enumerate(group):
                        ptr = llama_cpp.llama_get_embeddings_seq(llm.ctx, seq)
                        if not ptr:
                            raise RuntimeError("llama.cpp returned no pooled embedding")
                        out[index] = np.ctypeslib.as_array(ptr, shape=(n_embd,))
            finally:
                llama_cpp.llama_batch_free(batch)
            return unit_rows(out).tolist()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._llm is not None:
            self._llm.close()
            self._llm = None
