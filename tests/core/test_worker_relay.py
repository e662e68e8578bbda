"""A worker thread's chunks reach each request's async generator: one by one, or held by batched_emits() and
handed to the event loop in one call at the block's end, in order, nothing lost."""

from __future__ import annotations

import asyncio
import threading

from jarvis.engine import GenerationChunk, WorkerRelay, batched_emits


def test_batched_emits_hold_a_steps_chunks_and_deliver_them_in_order():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def make() -> WorkerRelay:
            return WorkerRelay()

        relays = [asyncio.run_coroutine_threadsafe(make(), loop).result() for _ in range(2)]

        async def waiting(relay: WorkerRelay) -> int:
            return relay._queue.qsize()

        def queued() -> list[int]:
            return [asyncio.run_coroutine_threadsafe(waiting(r), loop).result() for r in relays]

        wakeups = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakeups.append(a[0]), original(*a, **k))[1]  # type: ignore[method-assign]
        with batched_emits():
            for step in range(3):
                for k, relay in enumerate(relays):
                    relay.emit(GenerationChunk(text=f"{k}:{step} ", token_count=1))
            with batched_emits():  # a nested block joins the outer one
                relays[0].emit(GenerationChunk(text="end", finish_reason="stop"))
            relays[1].emit(GenerationChunk(text="end", finish_reason="length"))
            assert len(wakeups) == 0
        assert len(wakeups) == 1  # one call for the whole block, not one per chunk
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        assert queued() == [4, 4]

        async def drain(relay: WorkerRelay) -> tuple[str, str | None]:
            text, finish = "", None
            async for chunk in relay.chunks():
                text, finish = text + chunk.text, chunk.finish_reason
            return text, finish

        answers = [asyncio.run_coroutine_threadsafe(drain(r), loop).result(5) for r in relays]
        assert answers == [("0:0 0:1 0:2 end", "stop"), ("1:0 1:1 1:2 end", "length")]
        relays[0].emit(GenerationChunk(text="after", token_count=1))  # outside a block: delivered at once
        assert queued()[0] == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
