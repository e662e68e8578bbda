"""Embeddings: an `EmbeddingsRequest` → the engine's vectors → OpenAI's `list` of `embedding` objects.

`create_embeddings` runs a validated body (the batch plugin calls it for `/v1/embeddings` lines);
`embeddings_reply` is the HTTP route's: the body validated, the client admitted, the request prepared
(every 400, 429 and 503 before the engine runs), then the vectors. `encode_vector` writes one vector as
JSON numbers or, for `encoding_format: base64`, as its little-endian float32 bytes in base64 (OpenAI's
format, which the `openai` SDK decodes with numpy's `frombuffer(..., dtype="float32")`).
"""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING, Any

from jarvis.bodies import parse_body
from jarvis.engine import EmbeddingRequest, RequestContext
from jarvis.protocol_embeddings import EmbeddingsRequest

if TYPE_CHECKING:
    from jarvis.runtime import Runtime


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """The vector as the response carries it: floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def decode_vector(data: str) -> list[float]:
    """A base64 vector back to floats (what a client does; the tests and the bench use it)."""
    raw = base64.b64decode(data)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def embedding_request(body: EmbeddingsRequest, client: str | None = None) -> EmbeddingRequest:
    return EmbeddingRequest(model=body.model, inputs=body.inputs, dimensions=body.dimensions,
                            context=RequestContext(client=client))


async def create_embeddings(runtime: Runtime, body: EmbeddingsRequest, client: str | None = None) -> dict[str, Any]:
    """Embed every input of a validated body and return the OpenAI response body."""
    prepared = runtime.prepare_embeddings(embedding_request(body, client))
    result = await runtime.embed(prepared)
    # `protocol_embeddings.EmbeddingList` in plain dicts: thousands of floats need no second validation
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                     for i, v in enumerate(result.embeddings)],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


async def embeddings_reply(runtime: Runtime, raw: bytes, client: str) -> dict[str, Any]:
    """An HTTP embeddings request: validated, admitted and prepared before anything runs."""
    body = parse_body(raw, EmbeddingsRequest)
    runtime.admit(client)
    return await create_embeddings(runtime, body, client)
