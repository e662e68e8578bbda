"""The upstream engine: delegate to an existing OpenAI-compatible server (`vllm serve`, another Jarvis, ...).

`JARVIS_INFERENCE_ENGINE=openai` with `JARVIS_UPSTREAM_URL` makes Jarvis a
front for a server elsewhere, e.g. a vLLM deployment spread over a Ray
cluster: chat goes upstream as messages (the upstream applies its model's
template), streams come back chunk by chunk, an upstream error keeps its
status and message, and a client that disconnects closes the upstream
connection so the upstream stops generating. Adapters are forwarded to the
upstream's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

`JARVIS_UPSTREAMS` lists several such servers instead (replicas of one model):
the engine then routes each request through an `UpstreamPool`
(backends/upstream/pool.py: balancing, circuit breaking; backends/upstream/monitor.py:
health checks, adapter placement) and retries a failed attempt on another upstream as long as nothing
has reached the client yet. One JARVIS_UPSTREAM_URL is a pool of one. What a failure becomes for the client,
and which failures may be retried, is backends/upstream/errors.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jarvis import hookimpl
from jarvis.backends.upstream.errors import (
    TRANSPORT_ERRORS,
    answer_error,
    broke_off,
    retryable,
    score_failure,
    stream_error_event,
    stream_unfinished,
)
from jarvis.backends.upstream.monitor import UpstreamMonitor
from jarvis.backends.upstream.pool import Attempt, Upstream, UpstreamPool, parse_upstreams, shown_url_list
from jarvis.engine import (
    CONSTRAINT_FEATURES,
    SAMPLING_FEATURES,
    Engine,
    GenerationChunk,
    GenerationResult,
    ModelInfo,
    PreparedRequest,
    TokenLogprob,
    ToolCallDelta,
    ToolUse,
)
from jarvis.errors import APIError, ConfigError
from jarvis.settings import JarvisSettings, load_settings

T = TypeVar("T")

log = logging.getLogger("jarvis.backends.upstream.engine")

PREFIX = "JARVIS_UPSTREAM_"


class UpstreamSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=".env", extra="ignore")

    url: str | None = Field(
        None, pattern=r"^https?://\S+$", description="Base URL of the upstream OpenAI API, e.g. http://10.0.0.5:8000/v1.",
        json_schema_extra={"fix": "set JARVIS_UPSTREAM_URL to the upstream's /v1 URL, e.g. http://127.0.0.1:8001/v1"})
    urls: str | None = Field(
        None, validation_alias=AliasChoices("JARVIS_UPSTREAMS", "JARVIS_UPSTREAM_URLS"),
        description="Several upstreams serving the same model (replica router), set as JARVIS_UPSTREAMS: "
                    "comma-separated /v1 URLs, each optionally `key@url`; exclusive with JARVIS_UPSTREAM_URL.",
        json_schema_extra={"fix": "set JARVIS_UPSTREAMS to e.g. http://10.0.0.5:8000/v1,key@http://10.0.0.6:8000/v1"})
    api_key: str | None = Field(None, description="Bearer key the upstream requires (the default for every "
                                                  "upstream of JARVIS_UPSTREAMS); unset = none.",
                                json_schema_extra={"fix": "set JARVIS_UPSTREAM_API_KEY to the upstream's key"})
    model: str | None = Field(None, description="Upstream model id; unset = the first one it lists.",
                              json_schema_extra={"fix": "set JARVIS_UPSTREAM_MODEL to an id from the upstream's "
                                                                "/v1/models"})
    timeout: float = Field(600, gt=0, le=86_400, description="Seconds one upstream request may take.",
                           json_schema_extra={"fix": "set JARVIS_UPSTREAM_TIMEOUT to a number of seconds"})
    connect_timeout: float = Field(5, gt=0, le=600, description="Seconds to open a connection to the upstream.",
                                   json_schema_extra={"fix": "set JARVIS_UPSTREAM_CONNECT_TIMEOUT to a number "
                                                                     "of seconds"})
    start_timeout: float = Field(120, ge=0, le=86_400,
                                 description="Seconds the server waits at start for the upstream to answer.",
                                 json_schema_extra={"fix": "set JARVIS_UPSTREAM_START_TIMEOUT to a number of seconds"})
    health_interval: float = Field(5, gt=0, le=3600, description="Seconds between health checks (GET /models) "
                                                                 "of every upstream.",
                                   json_schema_extra={"fix": "set JARVIS_UPSTREAM_HEALTH_INTERVAL to seconds, e.g. 5"})
    health_timeout: float = Field(5, gt=0, le=600, description="Seconds a health check may take before the "
                                                               "upstream counts as down.",
                                  json_schema_extra={"fix": "set JARVIS_UPSTREAM_HEALTH_TIMEOUT to seconds, e.g. 5"})
    max_attempts: int = Field(3, ge=1, le=32, description="Upstreams one request may try (retries happen only "
                                                          "before the first byte reaches the client).",
                              json_schema_extra={"fix": "set JARVIS_UPSTREAM_MAX_ATTEMPTS to a count, e.g. 3"})
    failure_threshold: int = Field(3, ge=1, le=1000, description="Consecutive failures (requests or health checks) "
                                                                 "that open an upstream's circuit.",
                                   json_schema_extra={"fix": "set JARVIS_UPSTREAM_FAILURE_THRESHOLD to a count"})
    cooldown: float = Field(10, gt=0, le=86_400, description="Seconds an open circuit stays open before one probe "
                                                             "request may try the upstream (half-open).",
                            json_schema_extra={"fix": "set JARVIS_UPSTREAM_COOLDOWN to seconds, e.g. 10"})


#: This engine's own settings (JARVIS_UPSTREAM_*), for showing them without constructing the engine
#: (`jarvis doctor`).
OPTIONS = UpstreamSettings


def upstream_sampling(request: PreparedRequest) -> dict[str, Any]:
    """The optional sampling fields and the output constraint, as an OpenAI/vLLM server reads them."""
    body: dict[str, Any] = {}
    if request.top_k not in (0, -1):
        body["top_k"] = request.top_k
    if request.min_p:
        body["min_p"] = request.min_p
    if request.repetition_penalty != 1.0:
        body["repetition_penalty"] = request.repetition_penalty
    if request.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
    if request.ignore_eos:
        body["ignore_eos"] = True
    c = request.constraint
    if c is None:
        return body
    if c.kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif c.kind == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "response", "schema": c.spec, "strict": True}}
    else:  # vLLM's (and Jarvis's) structured outputs
        body["structured_outputs"] = {c.kind: list(c.spec) if c.kind == "choice" else c.spec}
    return body


def upstream_tools(tool_use: ToolUse) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` as the request gave them."""
    choice: Any = ({"type": "function", "function": {"name": tool_use.name}} if tool_use.choice == "function"
                   else tool_use.choice)
    return {"tools": [{"type": "function", "function": f} for f in tool_use.tools], "tool_choice": choice,
            "parallel_tool_calls": None if tool_use.parallel else False}


def tool_call_deltas(calls: Any) -> list[ToolCallDelta]:
    """OpenAI tool calls (a message's, or a stream delta's pieces) as Jarvis's deltas."""
    out = []
    for position, call in enumerate(calls or []):
        function = call.get("function") or {}
        out.append(ToolCallDelta(int(call.get("index", position)), call.get("id"), function.get("name"),
                                 function.get("arguments") or ""))
    return out


class OpenAIUpstreamEngine(Engine):
    name = "openai"
    applies_chat_template = True  # the upstream renders chat with its own model's template
    counts_tokens = False  # and checks its own context window
    handles_tools = True  # tools go upstream as they are; the upstream's calls come back
    #: Everything is passed on: the upstream honours it or answers its own 400, which reaches the client.
    supports = frozenset({*SAMPLING_FEATURES, *CONSTRAINT_FEATURES})

    def __init__(self, settings: JarvisSettings) -> None:
        super().__init__()
        self.settings = settings
        self.options: UpstreamSettings = load_settings(UpstreamSettings, prefix=PREFIX)
        o = self.options
        if o.url and o.urls:
            raise ConfigError("JARVIS_UPSTREAMS", shown_url_list(o.urls), "JARVIS_UPSTREAM_URL is set too; the two "
                              "are exclusive", "keep JARVIS_UPSTREAM_URL for one upstream, or list every upstream "
                              "in JARVIS_UPSTREAMS and unset JARVIS_UPSTREAM_URL")
        if not o.url and not o.urls:
            raise ConfigError("JARVIS_UPSTREAM_URL", None, "the openai engine needs the upstream server's URL",
                              "set JARVIS_UPSTREAM_URL, e.g. http://127.0.0.1:8001/v1 (a `vllm serve` or another "
                              "Jarvis), or JARVIS_UPSTREAMS to several")
        entries = parse_upstreams(o.urls, o.api_key) if o.urls else [(o.url.rstrip("/"), o.api_key)]
        self.url_setting = "JARVIS_UPSTREAMS" if o.urls else "JARVIS_UPSTREAM_URL"
        self.pool = UpstreamPool([Upstream(url, key) for url, key in entries], max_attempts=o.max_attempts,
                                 failure_threshold=o.failure_threshold, cooldown=o.cooldown)
        self.monitor = UpstreamMonitor(self.pool, health_timeout=o.health_timeout)
        self.url = entries[0][0] if len(entries) == 1 else ", ".join(url for url, _ in entries)
        self._info: ModelInfo | None = None
        self.upstream_model = o.model

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.monitor.open(self.options.timeout, self.options.connect_timeout)
        card = await self.monitor.wait_for_first(self.options.model, self.options.start_timeout, self.url_setting,
                                              key_set=bool(self.options.api_key))
        self.upstream_model = self.monitor.model
        self._info = ModelInfo(id=self.upstream_model, path=self.url,
                               max_model_len=int(card.get("max_model_len") or self.settings.max_model_len),
                               owned_by=str(card.get("owned_by") or "upstream"))
        self.monitor.start_checks(self.options.health_interval)
        log.info("upstream %s serves %s", self.url, self.upstream_model)

    async def stop(self) -> None:
        await self.monitor.close()

    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("upstream engine not started")
        return self._info

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        raise NotImplementedError("the upstream engine does not tokenize locally")

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {"upstream": self.url, "upstream_model": self.upstream_model,
                "batching": {"kind": "the upstream's own"},
                "routing": {"policy": "least outstanding requests, ties round-robin", "max_attempts": o.max_attempts,
                            "health_interval_s": o.health_interval, "failure_threshold": o.failure_threshold,
                            "cooldown_s": o.cooldown},
                "upstreams": self.pool.describe(),
                "embeddings": self.embedding_info()}

    # --- embeddings ------------------------------------------------------------------------------

    def embedding_info(self) -> dict[str, Any] | None:
        return {"pooling": "the upstream's", "normalize": "the upstream's", "dimensions": "the upstream's",
                "matryoshka": "passed on (dimensions goes upstream)", "path": "/embeddings"}

    async def embed(self, request: Any) -> Any:
        from jarvis.backends.upstream.embeddings import upstream_embed

        return await upstream_embed(self, request)

    # --- requests --------------------------------------------------------------------------------

    def body(self, request: PreparedRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": request.adapter or self.upstream_model, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p,
            "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
            "stop": list(request.stop) or None, "seed": request.seed, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(upstream_sampling(request))
        if request.kind == "chat":
            body.update(messages=request.messages, logprobs=request.logprobs or None,
                        top_logprobs=request.top_logprobs if request.logprobs else None)
            if request.tool_use is not None:
                body.update(upstream_tools(request.tool_use))
            if request.continue_final or not request.add_generation_prompt:  # vLLM's fields (and Jarvis's)
                body.update(continue_final_message=request.continue_final or None, add_generation_prompt=False)
        else:
            body.update(prompt=request.prompt if request.prompt_token_ids is None else request.prompt_token_ids,
                        echo=request.echo or None,
                        logprobs=request.top_logprobs if request.logprobs else None)
        path = "/chat/completions" if request.kind == "chat" else "/completions"
        return path, {k: v for k, v in body.items() if v is not None}

    def _next_attempt(self, request: PreparedRequest, tried: list[Upstream], error: APIError | None) -> Attempt:
        """The next upstream to try; after a failure with no upstream left, that failure is the answer."""
        if error is not None and len(tried) >= self.pool.max_attempts:
            raise self._given_up(request, tried, error)
        try:
            attempt = self.pool.attempt(request.adapter, tried)
        except APIError:
            if error is not None:
                raise self._given_up(request, tried, error) from None
            raise
        if tried:
            tried[-1].retries += 1
            log.warning("upstream %s failed (%s); retrying on %s", tried[-1].url, tried[-1].last_error,
                        attempt.upstream.url)
        tried.append(attempt.upstream)
        return attempt

    def _given_up(self, request: PreparedRequest, tried: list[Upstream], error: APIError) -> APIError:
        """The last failure, naming every upstream's state when there are several."""
        if len(self.pool.upstreams) == 1:
            return error
        summary = self.pool.unavailable(request.adapter, tried)
        return APIError(f"{error.message} {summary.message}", status_code=error.status_code,
                        error_type=error.error_type, code=error.code)

    async def post(self, request: PreparedRequest | Any, path: str, body: dict[str, Any],
                   read: Callable[[Any, str], T]) -> T:
        """POST `body` to `path` on an upstream the pool picks for `request` (its `adapter`), retried on the
        next one after a connection failure or a 502/503, each upstream scored; `read(json, url)` makes the
        answer of a 2xx from its JSON (raising an `APIError` for one of another shape)."""
        tried: list[Upstream] = []
        error: APIError | None = None
        while True:
            attempt = self._next_attempt(request, tried, error)
            url = attempt.upstream.url
            try:
                async with attempt.upstream.session.post(url + path, json=body) as response:
                    content = await response.read()
                if response.status >= 400:
                    raise answer_error(response.status, content, url)
                answer = read(json_answer(content, url, path), url)
                attempt.succeeded()
                return answer
            except (*TRANSPORT_ERRORS, APIError) as exc:
                if not retryable(exc):
                    raise score_failure(attempt, exc) from None
                error = score_failure(attempt, exc)
            finally:
                attempt.close()

    async def generate(self, request: PreparedRequest) -> GenerationResult:
        path, body = self.body(request, stream=False)
        data = await self.post(request, path, body, lambda answer, _: answer)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        request.context.mark_first_token()
        prompt_logprobs, logprobs = split_logprobs(choice, request)
        text = choice["message"].get("content") or "" if request.kind == "chat" else choice.get("text", "")
        calls = tool_call_deltas(choice["message"].get("tool_calls")) if request.kind == "chat" else []
        if request.echo and request.prompt and text.startswith(request.prompt):
            text = text[len(request.prompt):]  # the route adds the prompt back
        return GenerationResult(text, finish_reason(choice.get("finish_reason")),
                                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs, tool_calls=calls,
                                stop_sequence=stop_sequence(choice, request))

    async def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        path, body = self.body(request, stream=True)
        finished = False
        tried: list[Upstream] = []
        error: APIError | None = None
        while not finished:
            attempt = self._next_attempt(request, tried, error)
            url = attempt.upstream.url
            delivered = False  # once a chunk went out, the stream is never sent again
            try:
                async with attempt.upstream.session.post(url + path, json=body) as r:
                    if r.status >= 400:
                        raise answer_error(r.status, await r.read(), url)
                    held: GenerationChunk | None = None  # the finishing chunk waits for the usage that follows
                    async for event in sse_events(r.content.iter_any()):
                        if "error" in event:
                            raise stream_error_event(url, event["error"])
                        usage = event.get("usage")
                        for choice in event.get("choices") or []:
                            chunk = chunk_of(choice, request)
                            if chunk.finish_reason is not None:
                                held = chunk
                            elif chunk.token_count:  # text, held-back text, logprobs or a tool-call piece
                                delivered = True
                                yield chunk
                        if usage and held is not None:
                            held.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                            held.completion_tokens = int(usage.get("completion_tokens") or 0)
                    if held is None:
                        raise stream_unfinished(url)
                    attempt.succeeded()
                    finished = True
                    yield held
            except (*TRANSPORT_ERRORS, APIError) as exc:
                if not retryable(exc):
                    raise score_failure(attempt, exc) from None
                if delivered:  # part of the answer is out: never sent again, the client learns it broke off
                    score_failure(attempt, exc)
                    raise broke_off(url, exc) from None
                error = score_failure(attempt, exc)
            finally:
                attempt.close()

    # --- adapters: forwarded to the upstreams that take them ------------------------------------------

    async def load_adapter(self, adapter: Any) -> None:
        await self.monitor.load_adapter(adapter.name, adapter.path)

    async def unload_adapter(self, name: str) -> None:
        await self.monitor.unload_adapter(name)


def json_answer(content: bytes, url: str, path: str) -> Any:
    """An upstream's 2xx body as JSON; anything else is the upstream failing (502)."""
    try:
        return json.loads(content)
    except ValueError:
        raise APIError(f"The upstream {url} answered {path} with no JSON: {content[:200]!r}", status_code=502,
                       error_type="upstream_error", code="upstream_error") from None


async def sse_events(blocks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a Server-Sent Events stream (its bytes as they arrive), up to `data: [DONE]`."""
    pending = b""
    async for block in blocks:
        *lines, pending = (pending + block).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            try:
                yield json.loads(payload)
            except ValueError:
                continue


def finish_reason(value: Any) -> Any:
    return value if value in ("stop", "length", "tool_calls") else ("cancelled" if value == "abort" else "stop")


def chunk_of(choice: dict[str, Any], request: PreparedRequest) -> GenerationChunk:
    delta = choice.get("delta") or {}
    text = delta.get("content") or "" if request.kind == "chat" else choice.get("text") or ""
    _, logprobs = split_logprobs(choice, request)
    reason = choice.get("finish_reason")
    calls = tool_call_deltas(delta.get("tool_calls")) if request.kind == "chat" else []
    # an upstream streaming one event per token (vLLM, Jarvis) sends empty text while a token's text is held
    # back: still a token, passed on as one; the chat's opening event (its role) is not
    carried = (delta.get("content") is not None and not delta.get("role")) if request.kind == "chat" \
        else choice.get("text") is not None
    tokens = len(logprobs) or (1 if text or calls or (carried and not reason) else 0)
    return GenerationChunk(text=text, token_count=tokens, logprobs=logprobs,
                           finish_reason=finish_reason(reason) if reason else None, tool_calls=calls,
                           stop_sequence=stop_sequence(choice, request) if reason else None)


def stop_sequence(choice: dict[str, Any], request: PreparedRequest) -> str | None:
    """The stop string that ended the choice, where the upstream says (vLLM's and Jarvis's `stop_reason`);
    an OpenAI upstream does not, and the output then reads as ended by the model."""
    value = choice.get("stop_reason")
    return value if isinstance(value, str) and value in request.stop else None


def split_logprobs(choice: dict[str, Any], request: PreparedRequest
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
def jarvis_register_engines(register: Callable[..., None]) -> None:
    register("openai", OpenAIUpstreamEngine, options=OPTIONS)
