"""Embeddings on the upstream engine: the inputs passed on to an upstream's `/embeddings`, as the client sent them.

The upstream tokenizes, checks its context window and pools as its model does (Jarvis cannot know how: a
`vllm serve` of an embedding model, another Jarvis); `dimensions` is passed on for it to honour or refuse.
Upstreams are chosen, retried (only on a connection failure or a 502/503 before any answer) and scored by
the engine's replica pool exactly as for completions, and an upstream's error keeps its status and message
(`backends/upstream/errors.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jarvis.engine import EmbeddingRequest, EmbeddingResult
from jarvis.errors import APIError

if TYPE_CHECKING:
    from jarvis.backends.upstream.engine import OpenAIUpstreamEngine


def embeddings_body(request: EmbeddingRequest, upstream_model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": upstream_model, "input": request.inputs, "encoding_format": "float"}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def vectors_of(data: dict[str, Any], count: int, url: str) -> tuple[list[list[float]], int]:
    """The upstream's vectors in input order and its prompt token count; an answer of another shape is a 502."""
    try:
        items = sorted(data["data"], key=lambda item: item["index"])
        vectors = [[float(x) for x in item["embedding"]] for item in items]
        tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise APIError(f"The upstream {url} answered /embeddings in an unexpected shape ({type(exc).__name__}: "
                       f"{exc}).", status_code=502, error_type="upstream_error", code="upstream_error") from None
    if len(vectors) != count:
        raise APIError(f"The upstream {url} returned {len(vectors)} embeddings for {count} inputs.",
                       status_code=502, error_type="upstream_error", code="upstream_error")
    return vectors, tokens


async def upstream_embed(engine: OpenAIUpstreamEngine, request: EmbeddingRequest) -> EmbeddingResult:
    body = embeddings_body(request, engine.upstream_model)
    vectors, tokens = await engine.post(request, "/embeddings", body,
                                        lambda data, url: vectors_of(data, len(request.inputs), url))
    return EmbeddingResult(vectors, tokens)
