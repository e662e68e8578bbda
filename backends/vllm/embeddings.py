"""Embeddings on vLLM: a second, pooling engine beside the generating one, started on first use.

vLLM serves a model either as a generator or as a pooler (`runner="pooling"`), never both from one engine,
so the first `/v1/embeddings` request starts a second `AsyncLLMEngine` on the same folder, through the same
public API: `runner="pooling"`, `convert="embed"` (vLLM's adapter that turns a causal LM into an embedding
model: the final hidden state after the model's norm, no LM head) and `PoolerConfig(pooling_type="MEAN",
use_activation=True)` (mean over every prompt token, then L2 normalisation), the other engine arguments
as the generating engine has them, without LoRA or speculative decoding. Its KV cache only has to hold the
prompts of one scheduler step, so it gets room for `POOLING_KV_TOKENS` tokens instead of the generating
engine's size (on a GPU, and 90% of the memory share the generating engine leaves, for weights and
activations; not measured on a GPU yet). Each input is one `encode` request; vLLM batches them. The start's
wall time and the memory it added (the process tree's RSS before and after, and the unique memory of the
processes it started) are kept for `GET /v1/engine`. An engine core that died is replaced at the next request;
a pooling engine that cannot start is a 500 saying why, and the generating engine serves on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from contextlib import contextmanager
from typing import Any

from jarvis.errors import EngineFailure

log = logging.getLogger("jarvis.backends.vllm.embeddings")

#: Tokens of KV cache the pooling engine gets on CPU (at least 4 full contexts).
POOLING_KV_TOKENS = 8192
#: Generating-engine arguments a pooling engine must not take.
GENERATION_ONLY = ("enable_lora", "max_loras", "max_lora_rank", "speculative_config", "structured_outputs_config",
                   "kv_cache_memory_bytes")


def pooling_engine_args(engine_args: dict[str, Any], kv_bytes: int | None) -> dict[str, Any]:
    """The generating engine's arguments turned into a mean-pooling, normalising embedding engine's."""
    from vllm.config import PoolerConfig

    args = {k: v for k, v in engine_args.items() if k not in GENERATION_ONLY}
    args.update(runner="pooling", convert="embed",
                pooler_config=PoolerConfig(pooling_type="MEAN", use_activation=True))
    if kv_bytes is not None:
        args["kv_cache_memory_bytes"] = kv_bytes
    return args


def process_tree() -> list[Any]:
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def tree_rss_mib() -> float:
    total = 0
    for proc in process_tree():
        try:
            total += proc.memory_info().rss
        except Exception:  # a process that just ended
            continue
    return total / 2**20


@contextmanager
def without_env(name: str, drop: bool):
    """`name` left out of the environment while the block runs (vLLM reads it when it builds its config)."""
    saved = os.environ.pop(name, None) if drop else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


class VllmEmbedder:
    """The pooling engine: `embed` starts it on first use (once, however many requests wait for it)."""

    def __init__(self, engine_args: dict[str, Any], kv_bytes: int | None, usage_context: Any = None) -> None:
        self.engine_args = pooling_engine_args(engine_args, kv_bytes)
        self.kv_bytes = kv_bytes
        self.usage_context = usage_context
        self._engine: Any = None
        self._starting = asyncio.Lock()
        self.started: dict[str, Any] | None = None
        self.requests = 0

    async def _ensure(self) -> Any:
        async with self._starting:
            if self._engine is not None and self._engine.errored:
                log.warning("the vLLM pooling engine died; starting a new one")
                await self.shutdown()
            if self._engine is None:
                self._engine = await self._start()
            return self._engine

    async def _start(self) -> Any:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        before_pids = {p.pid for p in process_tree()}
        before = tree_rss_mib()
        began = time.monotonic()
        args = AsyncEngineArgs(**self.engine_args)
        context = {"usage_context": self.usage_context} if self.usage_context is not None else {}
        # VLLM_CPU_KVCACHE_SPACE (whole GiB, the generating engine's) would override the pooling engine's size
        try:
            with without_env("VLLM_CPU_KVCACHE_SPACE", drop=self.kv_bytes is not None):
                engine = await asyncio.to_thread(lambda: AsyncLLMEngine.from_engine_args(args, **context))
        except Exception as exc:
            raise EngineFailure(f"vLLM could not start the pooling engine that serves /v1/embeddings "
                                f"({type(exc).__name__}: {exc}); the generating engine is unaffected. On a GPU "
                                f"lower JARVIS_VLLM_GPU_MEMORY_UTILIZATION to leave it room.",
                                code="embeddings_engine_failed") from exc
        seconds = time.monotonic() - began
        new_uss = 0
        for proc in process_tree():
            if proc.pid not in before_pids:
                try:
                    new_uss += proc.memory_full_info().uss
                except Exception:
                    continue
        self.started = {"start_s": round(seconds, 1), "rss_before_mib": round(before),
                        "rss_after_mib": round(tree_rss_mib()), "new_processes_uss_mib": round(new_uss / 2**20),
                        "kv_cache_bytes": self.kv_bytes}
        log.info("vLLM pooling engine for /v1/embeddings started in %.1f s: %s", seconds, self.started)
        return engine

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        from vllm import PoolingParams, TokensPrompt

        engine = await self._ensure()
        self.requests += 1
        batch = uuid.uuid4().hex[:12]

        async def one(index: int, ids: list[int]) -> list[float]:
            final = None
            async for output in engine.encode(TokensPrompt(prompt_token_ids=ids),
                                              PoolingParams(task="embed", use_activation=True),
                                              f"embd-{batch}-{index}"):
                final = output
            if final is None:
                raise RuntimeError("vLLM returned no embedding")
            return final.outputs.data.float().tolist()

        return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(token_ids))))

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    def describe(self) -> dict[str, Any]:
        return {"second_engine": "a vLLM pooling engine (runner=pooling, convert=embed, MEAN, normalised) "
                                 "started on the first /v1/embeddings request",
                "running": self._engine is not None, "requests": self.requests, "start": self.started}
