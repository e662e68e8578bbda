"""Pydantic models of OpenAI's embeddings API (`POST /v1/embeddings`): the request and the response.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists, as OpenAI takes it;
every wrong shape, an empty list, an empty string or an empty token-id list is one clear 400 naming `input`.
`encoding_format` is `float` (JSON numbers) or `base64` (the little-endian float32 bytes of each vector, which
the `openai` SDK asks for by default and decodes). An unknown field is a 400 naming it, as on every route.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: OpenAI's limit on the inputs of one request.
MAX_INPUTS = 2048

INPUT_SHAPE = ("input must be a string, a list of strings, a list of token ids (non-negative integers) or a list "
               "of token-id lists")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, token ids, or a list of token-id lists: one vector each "
                    f"(at most {MAX_INPUTS} inputs, none empty).")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: each vector's little-endian float32 bytes.")
    dimensions: int | None = Field(None, ge=1, description="Only for models trained for shorter vectors "
                                                           "(Matryoshka); the served engines' models are not.")
    # accepted and ignored, as OpenAI's own bookkeeping
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        """One clear message for every wrong shape (not one per member of the union)."""
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
            return value
        if not isinstance(value, list):
            raise ValueError(INPUT_SHAPE)
        if not value:
            raise ValueError("input must not be an empty list")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"input holds {len(value)} items; at most {MAX_INPUTS} are allowed per request")
        if all(isinstance(v, str) for v in value):
            empty = [i for i, v in enumerate(value) if not v]
            if empty:
                raise ValueError(f"input[{empty[0]}] is an empty string; every input needs at least one token")
            return value
        if all(_is_id(v) for v in value):
            return value
        if all(isinstance(v, list) and all(_is_id(t) for t in v) for v in value):
            empty = [i for i, v in enumerate(value) if not v]
            if empty:
                raise ValueError(f"input[{empty[0]}] is an empty token-id list; every input needs at least one "
                                 "token")
            return value
        raise ValueError(INPUT_SHAPE)

    @property
    def inputs(self) -> list[str | list[int]]:
        """Each input: text, or token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [list(self.input)]
        return list(self.input)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="The vector, or its float32 bytes in base64.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
