"""Embeddings on the upstream engine: the inputs passed on to an upstream's `/embeddings`, as the client sent them.

The upstream tokenizes, checks its context window and pools as its model does (Jarvis cannot know how: a
`vllm serve` of an embedding model, another Jarvis); `dimensions` is passed on for it to honour or refuse.
Upstreams are chosen, retried (only on a connection failure or a 502/503 before any answer) and scored by
the engine's replica pool exactly as for completions, and an upstream's error keeps its status and message
(`backends/upstream/errors.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from jarvis.backends.upstream.errors import RETRYABLE, answer_error, score_failure
from jarvis.engine import EmbeddingRequest, EmbeddingResult
from jarvis.errors import APIError

if TYPE_CHECKING:
    from jarvis.backends.upstream.engine import OpenAIUpstreamEngine
    from jarvis.backends.upstream.pool import Upstream


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
    tried: list[Upstream] = []
    error: APIError | None = None
    while True:
        attempt = engine._next_attempt(request, tried, error)  # type: ignore[arg-type]  (reads .adapter only)
        try:
            response = await attempt.upstream.client.post("/embeddings", json=body)
            if response.status_code >= 400:
                raise answer_error(response.status_code, response.content, attempt.upstream.url)
            vectors, tokens = vectors_of(response.json(), len(request.inputs), attempt.upstream.url)
            attempt.succeeded()
            return EmbeddingResult(vectors, tokens)
        except RETRYABLE as exc:
            error = score_failure(attempt, exc)
        except (httpx.HTTPError, APIError) as exc:
            raise score_failure(attempt, exc) from None
        finally:
            attempt.close()
