"""Embeddings on the runtime's side: a request checked against the served model and the engine, made ready.

`prepare_embeddings` is to `Engine.embed` what `jarvis.prepare.prepare` is to a generation: pure, no I/O. It
refuses what cannot be served with a 400 naming the field (an adapter in `model`, `dimensions` on a model
without Matryoshka training, an engine without embeddings), and for an engine that counts tokens it
tokenizes each text (one `<bos>`, as a completion's prompt; never a second one), checks token ids against the
vocabulary and every input against the context window. `EMBEDDING_METHOD` is what every local engine declares
in `GET /v1/engine`: the same pooling and normalisation everywhere, so the engines' vectors agree.
`as_hooked_request` is how an embeddings run appears to the request hooks (telemetry counts it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from jarvis.engine import EmbeddingRequest, EmbeddingResult, Engine, GenerationResult, ModelInfo, PreparedRequest
from jarvis.errors import InvalidRequest
from jarvis.prepare import ServedModel, brings_bos, check_token_ids

#: How every local engine embeds: the mean of the final (post-final-norm) hidden state over all the input's
#: tokens (its <bos> too), then L2 normalisation; no LM head.
EMBEDDING_METHOD = {"pooling": "mean", "normalize": True, "hidden_state": "final, after the final norm",
                    "matryoshka": False}


def embedding_method(dimensions: int, **extra: Any) -> dict[str, Any]:
    """What a local engine's `embedding_info()` returns: `EMBEDDING_METHOD` with its vector size."""
    return {**EMBEDDING_METHOD, "dimensions": dimensions, **extra}


def prepare_embeddings(request: EmbeddingRequest, engine: Engine, info: ModelInfo,
                       served: ServedModel) -> EmbeddingRequest:
    """The request as `engine.embed` takes it (see the module's docstring), or the 400 naming the field."""
    method = engine.embedding_info()
    if method is None:
        raise InvalidRequest(f"The {engine.name} engine does not serve embeddings.", param="model",
                             code="embeddings_not_supported")
    if served.adapter is not None:
        raise InvalidRequest(f"`{served.id}` is a LoRA adapter; embeddings are served for the base model only "
                             "(the first model GET /v1/models lists): name it instead.", param="model",
                             code="adapter_not_supported")
    if request.dimensions is not None and not method.get("matryoshka"):
        raise InvalidRequest(f"This model does not support specifying dimensions: its vectors have "
                             f"{method.get('dimensions', 'a fixed number of')} dimensions (it was not trained "
                             "for shorter ones). Omit `dimensions`.", param="dimensions",
                             code="unsupported_parameter")
    if not engine.counts_tokens:
        return request
    ids: list[list[int]] = []
    for index, given in enumerate(request.inputs):
        if isinstance(given, str):
            tokens = engine.tokenize(given, add_special=not brings_bos(given, info))
        else:
            check_token_ids(given, info.vocab_size, "input")
            tokens = list(given)
        if not tokens:
            raise InvalidRequest(f"input[{index}] has no tokens; every input needs at least one.", param="input",
                                 code="invalid_value")
        if len(tokens) > info.max_model_len:
            raise InvalidRequest(f"This model's maximum context length is {info.max_model_len} tokens, however "
                                 f"input[{index}] has {len(tokens)} tokens. Please reduce the length of the input "
                                 f"(or raise JARVIS_MAX_MODEL_LEN).", param="input", code="context_length_exceeded")
        ids.append(tokens)
    return replace(request, token_ids=ids)


def as_hooked_request(request: EmbeddingRequest) -> PreparedRequest:
    """The embeddings run as `jarvis_request_started/finished` see it: kind "embedding", no completion."""
    return PreparedRequest(prompt=None, model=request.model, max_tokens=None, kind="embedding",
                           adapter=request.adapter, context=request.context)


def as_hooked_result(result: EmbeddingResult) -> GenerationResult:
    return GenerationResult(text="", finish_reason="stop", prompt_tokens=result.prompt_tokens, completion_tokens=0)
