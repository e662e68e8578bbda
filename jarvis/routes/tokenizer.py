"""vLLM's tokenizer routes, at the server root as `vllm serve` has them: `GET /tokenizer_info`,
`POST /tokenize`, `POST /detokenize`. Eval harnesses (lm-evaluation-harness's remote tokenizer) count and
build token-id prompts through them, so the client needs no local copy of the model's tokenizer."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from pydantic import BaseModel, ConfigDict, Field

from jarvis.chat_format import ChatFormatError
from jarvis.errors import InvalidRequest
from jarvis.protocol import ChatMessage
from jarvis.routes.openai import parse_body, runtime_of
from jarvis.routes.openapi_docs import json_body


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def local_engine(request: Request) -> Any:
    runtime = runtime_of(request)
    runtime.require_ready()
    if not runtime.engine.counts_tokens:
        raise InvalidRequest(f"The {runtime.engine.name} engine has no local tokenizer; ask the upstream's "
                             "/tokenize.", code="tokenizer_not_available")
    return runtime


class TokenizerController(Controller):
    path = "/"
    tags = ["Tokenizer"]

    @get("/tokenizer_info", summary="The served model's tokenizer: special tokens, chat template, limits.")
    async def tokenizer_info(self, request: Request) -> dict[str, Any]:
        runtime = local_engine(request)
        info = runtime.require_ready()
        return {"tokenizer_class": f"{runtime.engine.name} tokenizer of {runtime.model_id}",
                "bos_token": info.bos_token or None, "eos_token": info.eos_token or None, "pad_token": None,
                "chat_template": info.chat_template, "model_max_length": info.max_model_len,
                "vocab_size": info.vocab_size, "add_bos_token": bool(info.bos_token)}

    @post("/tokenize", status_code=200, summary="Text (or chat messages, rendered) to token ids.",
          operation_class=json_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest)
        runtime = local_engine(request)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("Send exactly one of prompt or messages.", param="prompt")
        text = body.prompt
        if body.messages is not None:
            served = runtime.resolve_model(body.model or runtime.model_id)
            fmt = runtime.chat_format(served.id)
            try:
                text = fmt([m.normalised() for m in body.messages], body.add_generation_prompt)
            except ChatFormatError as exc:
                raise InvalidRequest(f"cannot render the conversation with chat format {fmt.name!r}: {exc}",
                                     param="messages") from None
        special = body.add_special_tokens and not runtime.brings_bos(text or "")  # never a second <bos>
        ids = runtime.engine.tokenize(text or "", add_special=special)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": runtime.require_ready().max_model_len,
                               "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [runtime.engine.detokenize([t]) for t in ids]
        return out

    @post("/detokenize", status_code=200, summary="Token ids to text.", operation_class=json_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest)
        runtime = local_engine(request)
        size = runtime.require_ready().vocab_size
        bad = [t for t in body.tokens if t < 0 or (size is not None and t >= size)]
        if bad:
            raise InvalidRequest(f"token ids outside the vocabulary (0..{size - 1 if size else '?'}): {bad[:5]}",
                                 param="tokens", code="invalid_token_id")
        return {"prompt": runtime.engine.detokenize(body.tokens)}
