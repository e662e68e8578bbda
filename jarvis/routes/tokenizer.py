"""vLLM's tokenizer routes, at the server root as `vllm serve` has them: `GET /tokenizer_info`,
`POST /tokenize`, `POST /detokenize`. Eval harnesses (lm-evaluation-harness's remote tokenizer) count and
build token-id prompts through them, so the client needs no local copy of the model's tokenizer."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from pydantic import BaseModel, ConfigDict, Field

from jarvis.engine import ToolUse
from jarvis.errors import InvalidRequest
from jarvis.prepare import brings_bos, check_token_ids, render_chat
from jarvis.protocol import ChatMessage, Tool
from jarvis.routes.openai import parse_body, runtime_of
from jarvis.routes.openapi_docs import json_body
from jarvis.runtime import Runtime


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    #: The functions offered, rendered into the prompt as a chat completion with these tools would be.
    tools: list[Tool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def local_engine(request: Request) -> Runtime:
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
        if body.tools and body.messages is None:
            raise InvalidRequest("tools are rendered with messages; send messages too.", param="tools")
        info = runtime.require_ready()
        text = body.prompt
        if body.messages is not None:  # as the chat path renders it (`jarvis.prepare.render_chat`)
            served = runtime.resolve_model(body.model or runtime.model_id)
            tool_use = ToolUse(tuple(t.function.model_dump(exclude_none=True) for t in body.tools)) \
                if body.tools else None
            text = render_chat(runtime.chat_format(served.id), [m.normalised() for m in body.messages], tool_use,
                               body.add_generation_prompt)
        special = body.add_special_tokens and not brings_bos(text or "", info)  # never a second <bos>
        ids = runtime.engine.tokenize(text or "", add_special=special)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [runtime.engine.detokenize([t]) for t in ids]
        return out

    @post("/detokenize", status_code=200, summary="Token ids to text.", operation_class=json_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest)
        runtime = local_engine(request)
        check_token_ids(body.tokens, runtime.require_ready().vocab_size, "tokens")
        return {"prompt": runtime.engine.detokenize(body.tokens)}
