"""The upstream engine: delegate to an existing OpenAI-compatible server (`vllm serve`, another Jarvis, ...).

`JARVIS_INFERENCE_ENGINE=openai` with `JARVIS_UPSTREAM_URL` makes Jarvis a
front for a server elsewhere, e.g. a vLLM deployment spread over a Ray
cluster: chat goes upstream as messages (the upstream applies its model's
template), streams come back chunk by chunk, an upstream error keeps its
status and message, and a client that disconnects closes the upstream
connection so the upstream stops generating. Adapters are forwarded to the
upstream's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jarvis import hookimpl
from jarvis.engine import Engine, GenerationChunk, GenerationRequest, GenerationResult, ModelInfo, TokenLogprob
from jarvis.errors import APIError, ConfigError, EngineUnavailable
from jarvis.settings import JarvisSettings, load_settings

log = logging.getLogger("jarvis.backends.openai_upstream")

PREFIX = "JARVIS_UPSTREAM_"


class UpstreamSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    url: str | None = Field(
        None, pattern=r"^https?://\S+$", description="Base URL of the upstream OpenAI API, e.g. http://10.0.0.5:8000/v1.",
        json_schema_extra={"fix": "set JARVIS_UPSTREAM_URL to the upstream's /v1 URL, e.g. http://127.0.0.1:8001/v1"})
    api_key: str | None = Field(None, description="Bearer key the upstream requires; unset = none.",
                                json_schema_extra={"fix": "set JARVIS_UPSTREAM_API_KEY to the upstream's key"})
    model: str | None = Field(None, description="Upstream model id; unset = the first one it lists.",
                              json_schema_extra={"fix": "set JARVIS_UPSTREAM_MODEL to an id from the upstream's /v1/models"})
    timeout: float = Field(600, gt=0, le=86_400, description="Seconds one upstream request may take.",
                           json_schema_extra={"fix": "set JARVIS_UPSTREAM_TIMEOUT to a number of seconds"})
    connect_timeout: float = Field(5, gt=0, le=600, description="Seconds to open a connection to the upstream.",
                                   json_schema_extra={"fix": "set JARVIS_UPSTREAM_CONNECT_TIMEOUT to a number of seconds"})
    start_timeout: float = Field(120, ge=0, le=86_400,
                                 description="Seconds the server waits at start for the upstream to answer.",
                                 json_schema_extra={"fix": "set JARVIS_UPSTREAM_START_TIMEOUT to a number of seconds"})


def upstream_error(response_status: int, body: bytes | str, url: str) -> APIError:
    """The upstream's error, keeping its message; statuses that are Jarvis's own problem become 502."""
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        error, message = {}, None
    message = message or (body.decode(errors="replace") if isinstance(body, bytes) else str(body))[:500]
    if response_status in (401, 403):
        return APIError(f"The upstream {url} refused Jarvis's credentials ({response_status}): {message}. "
                        f"Set JARVIS_UPSTREAM_API_KEY.", status_code=502, error_type="upstream_error",
                        code="upstream_auth")
    if response_status >= 500:
        return APIError(f"The upstream {url} failed ({response_status}): {message}", status_code=502,
                        error_type="upstream_error", code="upstream_error")
    return APIError(message, status_code=response_status, param=error.get("param") if isinstance(error, dict) else None,
                    code=error.get("code") if isinstance(error, dict) else None,
                    error_type=(error.get("type") if isinstance(error, dict) else None) or "invalid_request_error")


def unreachable(url: str, exc: Exception) -> EngineUnavailable:
    return EngineUnavailable(f"The upstream {url} is unreachable ({type(exc).__name__}: {exc}).",
                             code="upstream_unreachable")


class OpenAIUpstreamEngine(Engine):
    name = "openai"
    applies_chat_template = True  # the upstream renders chat with its own model's template
    counts_tokens = False  # and checks its own context window

    def __init__(self, settings: JarvisSettings) -> None:
        super().__init__()
        self.settings = settings
        self.options: UpstreamSettings = load_settings(UpstreamSettings, prefix=PREFIX)
        if not self.options.url:
            raise ConfigError("JARVIS_UPSTREAM_URL", None, "the openai engine needs the upstream server's URL",
                              "set JARVIS_UPSTREAM_URL, e.g. http://127.0.0.1:8001/v1 (a `vllm serve` or another "
                              "Jarvis)")
        self.url = self.options.url.rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._info: ModelInfo | None = None
        self.upstream_model = self.options.model

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(self.options.timeout, connect=self.options.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        models = await self._wait_for_models()
        ids = [m.get("id") for m in models]
        if self.upstream_model is None:
            self.upstream_model = ids[0] if ids else None
        if self.upstream_model not in ids:
            raise ConfigError("JARVIS_UPSTREAM_MODEL", self.options.model, f"the upstream serves {ids or 'no model'}",
                              "set JARVIS_UPSTREAM_MODEL to one of those")
        card = next(m for m in models if m.get("id") == self.upstream_model)
        self._info = ModelInfo(id=self.upstream_model, path=self.url,
                               max_model_len=int(card.get("max_model_len") or self.settings.max_model_len),
                               owned_by=str(card.get("owned_by") or "upstream"))
        log.info("upstream %s serves %s", self.url, self.upstream_model)

    async def _wait_for_models(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.options.start_timeout
        while True:
            try:
                response = await self._client.get("/models")
                if response.status_code == 200:
                    return response.json().get("data", [])
                problem = f"GET /models answered {response.status_code}: {response.text[:200]}"
                if response.status_code in (401, 403):
                    raise ConfigError("JARVIS_UPSTREAM_API_KEY", "***" if self.options.api_key else None,
                                      f"the upstream refused the key ({problem})", "set the upstream's key")
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise ConfigError("JARVIS_UPSTREAM_URL", self.url, f"the upstream did not answer ({problem})",
                                  "start the upstream server first, check the URL (it ends in /v1), or raise "
                                  "JARVIS_UPSTREAM_START_TIMEOUT")
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("upstream engine not started")
        return self._info

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        raise NotImplementedError("the upstream engine does not tokenize locally")

    def describe(self) -> dict[str, Any]:
        return {"upstream": self.url, "upstream_model": self.upstream_model,
                "batching": {"kind": "the upstream's own"}}

    # --- requests --------------------------------------------------------------------------------

    def body(self, request: GenerationRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": request.adapter or self.upstream_model, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p,
            "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
            "stop": list(request.stop) or None, "seed": request.seed, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.kind == "chat":
            body.update(messages=request.messages, logprobs=request.logprobs or None,
                        top_logprobs=request.top_logprobs if request.logprobs else None)
            return "/chat/completions", body
        body.update(prompt=request.prompt, echo=request.echo or None,
                    logprobs=request.top_logprobs if request.logprobs else None)
        return "/completions", body

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        path, body = self.body(request, stream=False)
        self.stats.requests_started += 1
        try:
            response = await self._client.post(path, json={k: v for k, v in body.items() if v is not None})
        except httpx.HTTPError as exc:
            self.stats.requests_cancelled += 1
            raise unreachable(self.url, exc) from None
        finally:
            self.stats.requests_finished += 1
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.content, self.url)
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        request.first_token_at = request.first_token_at or time.monotonic()
        prompt_logprobs, logprobs = split_logprobs(choice, request)
        text = choice["message"].get("content") or "" if request.kind == "chat" else choice.get("text", "")
        if request.echo and request.prompt and text.startswith(request.prompt):
            text = text[len(request.prompt):]  # the route adds the prompt back
        self.stats.tokens_generated += int(usage.get("completion_tokens") or 0)
        return GenerationResult(text, finish_reason(choice.get("finish_reason")),
                                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        path, body = self.body(request, stream=True)
        self.stats.requests_started += 1
        finished = False
        try:
            async with self._client.stream("POST", path, json={k: v for k, v in body.items() if v is not None}) as r:
                if r.status_code >= 400:
                    raise upstream_error(r.status_code, await r.aread(), self.url)
                held: GenerationChunk | None = None  # the finishing chunk waits for the usage that follows it
                async for event in sse_events(r):
                    if "error" in event:
                        error = event["error"]
                        raise APIError(error.get("message", "upstream error"), status_code=502,
                                       error_type="upstream_error", code=error.get("code"))
                    usage = event.get("usage")
                    for choice in event.get("choices") or []:
                        chunk = chunk_of(choice, request)
                        if chunk.finish_reason is not None:
                            held = chunk
                        elif chunk.text or chunk.logprobs:
                            self.stats.tokens_generated += chunk.token_count
                            yield chunk
                    if usage and held is not None:
                        held.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        held.completion_tokens = int(usage.get("completion_tokens") or 0)
                if held is None:
                    raise APIError(f"The upstream {self.url} ended the stream without finishing", status_code=502,
                                   error_type="upstream_error", code="upstream_incomplete")
                finished = True
                yield held
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from None
        finally:
            self.stats.requests_finished += 1
            if not finished:
                self.stats.requests_cancelled += 1

    # --- adapters: forwarded to the upstream -------------------------------------------------------

    async def load_adapter(self, adapter: Any) -> None:
        await self._adapter_call("/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path})

    async def unload_adapter(self, name: str) -> None:
        await self._adapter_call("/unload_lora_adapter", {"lora_name": name})

    async def _adapter_call(self, path: str, body: dict[str, Any]) -> None:
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from None
        if response.status_code in (404, 405):
            raise NotImplementedError(f"the upstream {self.url} has no {path} endpoint (for vLLM, start it with "
                                      f"--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.content, self.url)


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a Server-Sent Events stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            continue


def finish_reason(value: Any) -> Any:
    return value if value in ("stop", "length") else ("cancelled" if value == "abort" else "stop")


def chunk_of(choice: dict[str, Any], request: GenerationRequest) -> GenerationChunk:
    text = (choice.get("delta") or {}).get("content") or "" if request.kind == "chat" else choice.get("text") or ""
    _, logprobs = split_logprobs(choice, request)
    reason = choice.get("finish_reason")
    return GenerationChunk(text=text, token_count=len(logprobs) or (1 if text else 0), logprobs=logprobs,
                           finish_reason=finish_reason(reason) if reason else None)


def split_logprobs(choice: dict[str, Any], request: GenerationRequest
                   ) -> tuple[list[TokenLogprob] | None, list[TokenLogprob]]:
    """OpenAI logprobs (chat or completion shape) → (prompt logprobs when echoed, generated logprobs)."""
    data = choice.get("logprobs")
    if not data:
        return None, []
    if request.kind == "chat":
        return None, [TokenLogprob(e["token"], e.get("logprob"), e.get("bytes"),
                                   [(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
                      for e in data.get("content") or []]
    tops = data.get("top_logprobs") or []
    entries = [TokenLogprob(token, lp, list(token.encode()),
                            sorted((tops[i] or {}).items(), key=lambda kv: -kv[1]) if i < len(tops) else ())
               for i, (token, lp) in enumerate(zip(data.get("tokens") or [], data.get("token_logprobs") or []))]
    if not (request.echo and request.prompt):
        return None, entries
    consumed, split = 0, 0  # the echoed prompt's tokens come first: split where their text ends
    while split < len(entries) and consumed < len(request.prompt):
        consumed += len(entries[split].token)
        split += 1
    return entries[:split], entries[split:]


@hookimpl
def jarvis_register_engines(register: Callable[[str, Callable[..., Engine]], None]) -> None:
    register("openai", OpenAIUpstreamEngine)
