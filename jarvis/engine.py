"""The engine contract: what every delegate (llama.cpp, HF, vLLM, upstream) speaks.

`jarvis.serving` turns a wire request into a `GenerationRequest` (what the client asked for); the runtime's
`prepare` (`jarvis.prepare`) turns that into a `PreparedRequest` (rendered, tokenized, the constraint
compiled) and only the runtime calls `Engine.stream` or `Engine.generate` with it. No engine sees HTTP, and
nothing above the runtime knows which engine answers. Subclasses implement `start`, `stream`, `tokenize`
and `model_info`; `generate` defaults to draining `stream`, so an engine is correct with one generation
path and may override `generate` where it has a faster one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]

_request_ids = itertools.count(1)
R = TypeVar("R", bound="GenerationRequest")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated (or prompt) token with its log-probability and the best alternatives.

    `token_id` is the token's id in the model's vocabulary, for callers that need the exact tokens (RL
    training samples through the engine and must not re-tokenize the text); None only where the engine
    cannot know it (an OpenAI-compatible upstream that reports no ids). It is internal: the OpenAI routes
    render `token`, `logprob`, `bytes` and `top` only."""

    token: str
    logprob: float | None
    bytes: list[int] | None = None
    top: Sequence[tuple[str, float]] = ()
    token_id: int | None = None


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must match, decoded under that constraint (never checked afterwards).

    kind: "json_object" (any JSON object), "json_schema" (`spec`: the schema, a dict), "regex" (`spec`:
    the pattern), "choice" (`spec`: a tuple of the allowed strings). `param` is the request field it came
    from, for the errors that name it."""

    kind: Literal["json_object", "json_schema", "regex", "choice"]
    spec: Any = None
    param: str = "response_format"


@dataclass(frozen=True)
class ToolUse:
    """The functions a chat request offers the model and how it may use them (OpenAI's `tools`,
    `tool_choice`, `parallel_tool_calls`). `tools` holds OpenAI function objects ({name, description,
    parameters}); `choice` is "none", "auto", "required" or "function" (then `name` is the one to call)."""

    tools: tuple[dict[str, Any], ...]
    choice: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> tuple[dict[str, Any], ...]:
        """The functions the model is told about: none under tool_choice "none"."""
        return () if self.choice == "none" else self.tools

    @property
    def constrained(self) -> bool:
        """A call is required: decoding is constrained to valid call JSON instead of parsed from free text."""
        return self.choice in ("required", "function")


@dataclass
class ToolCallDelta:
    """A piece of a tool call in the order the model produced it: its first piece carries `id` and `name`,
    later ones more of `arguments` (a JSON text). In a `GenerationResult` each call is one whole delta."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


#: Optional request features an engine may declare in `Engine.supports` (the runtime refuses the rest).
SAMPLING_FEATURES = ("top_k", "min_p", "repetition_penalty", "logit_bias")
CONSTRAINT_FEATURES = ("json_object", "json_schema", "regex", "choice")


@dataclass
class RequestContext:
    """What is learned about one generation while it is served; the one mutable part of a request."""

    request_id: str = field(default_factory=lambda: f"gen-{next(_request_ids)}")
    #: Who asked (an API key's fingerprint or the peer address; never a key): rate limits, logs.
    client: str | None = None
    #: The name of the engine that serves the request (for hooks, logs); set by the runtime.
    engine: str | None = None
    #: `time.monotonic()` when the first generated token reached the server; set by the runtime's
    #: stream wrapper and by `Engine.generate` (an engine that overrides `generate` sets it itself).
    first_token_at: float | None = None
    #: The wire API the request came in by ("openai", "anthropic", "tinker"): telemetry's `api` label.
    api: str = "openai"

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()


class ToolCallReader(Protocol):
    """Reads tool calls out of generated text as it arrives (`jarvis.tool_calls` has one per syntax)."""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """The part of `text` that is content, and the call pieces it completed."""
        ...

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the output: what was held back, as content and call pieces."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the client asked for it, engine-neutral and immutable: the prompt (text, token ids
    or chat `messages`), the sampling parameters and what to decode under, plus a per-request `context`
    (id, client, engine, first-token time) that is the only part that changes while it is served. The
    runtime's `prepare` makes a `PreparedRequest` of it; nothing edits one."""

    prompt: str | None
    model: str
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: 0 = off (every token); 1 = greedy.
    top_k: int = 0
    min_p: float = 0.0
    #: Multiplicative, as in vLLM and transformers: > 1 discourages tokens already in prompt or output.
    repetition_penalty: float = 1.0
    #: Token id → bias added to its logit before sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    constraint: OutputConstraint | None = None
    #: The functions the model may call (chat only); the runtime renders them and parses the calls, or an
    #: engine that `handles_tools` (an upstream server) does both.
    tool_use: ToolUse | None = None
    #: vLLM's benchmarking switch: keep generating through end-of-sequence tokens up to max_tokens.
    ignore_eos: bool = False
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    messages: list[dict[str, Any]] | None = None
    #: Chat: open the assistant's turn after the messages (the chat template's generation prompt).
    add_generation_prompt: bool = True
    #: Chat: the last message is an assistant turn the output continues (a prefill), not a finished one.
    continue_final: bool = False
    #: A token-id prompt, as the client sent it (a prepared request holds the ids of every prompt).
    prompt_token_ids: list[int] | None = None
    #: "embedding": an embeddings request as the request hooks see it (no sampling, no completion tokens).
    kind: Literal["completion", "chat", "embedding"] = "completion"
    context: RequestContext = field(default_factory=RequestContext, compare=False)

    @property
    def request_id(self) -> str:
        return self.context.request_id

    @property
    def engine(self) -> str | None:
        return self.context.engine

    @property
    def client(self) -> str | None:
        return self.context.client

    @property
    def first_token_at(self) -> float | None:
        return self.context.first_token_at

    def mark_first_token(self, chunk: GenerationChunk) -> None:
        """Record the arrival time of the first chunk that carries generated tokens."""
        if chunk.token_count or chunk.text:
            self.context.mark_first_token()

    def for_choice(self: R, index: int, seed: int | None) -> R:
        """Choice `index` of `n`: the same generation with its own seed and its own context."""
        ctx = self.context
        return replace(self, seed=seed, context=RequestContext(f"{ctx.request_id}-{index}", ctx.client, ctx.engine,
                                                               api=ctx.api))


@dataclass(frozen=True)
class PreparedRequest(GenerationRequest):
    """A request as the engine takes it, made only by the runtime (`jarvis.prepare`): the model resolved to
    the base or an adapter, chat rendered into `prompt` with the chat format's stops added to `stop`, the
    prompt tokenized into `prompt_token_ids` (where the engine counts tokens), `max_tokens` within the
    context window, and what the runtime derived for the engine."""

    #: The adapter that serves the request (None: the base model).
    adapter: str | None = None
    #: The engine's own compiled form of `constraint` (`Engine.compile_constraint`'s result: a grammar, a
    #: matcher factory, a request field); only the engine that made it reads it.
    compiled_constraint: object | None = None
    #: Makes the reader of the tool calls in this request's output (None: no tools offered, or the engine
    #: `handles_tools`).
    tool_reader: Callable[[], ToolCallReader] | None = None
    #: The prompt's leading <bos> is the client's (token ids, or text that begins with it): echo scores it
    #: as the first prompt token (logprob None) instead of treating it as the server's context.
    score_bos: bool = False


@dataclass
class GenerationChunk:
    """Newly generated text (possibly several tokens) from a stream."""

    text: str
    token_count: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Filled on the last chunk only (the one with a finish_reason).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Filled on the first chunk only, when the request asked for echo with logprobs.
    prompt_logprobs: list[TokenLogprob] | None = None
    #: Tool-call pieces found in this chunk's part of the output (`text` is then what is not a call).
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    #: On the last chunk: the stop string that ended the output (one of the request's `stop`), when one did.
    stop_sequence: str | None = None

    def then(self, later: GenerationChunk) -> GenerationChunk:
        """This chunk followed by `later`, as one chunk."""
        return GenerationChunk(
            text=self.text + later.text, token_count=self.token_count + later.token_count,
            logprobs=[*self.logprobs, *later.logprobs], finish_reason=later.finish_reason,
            prompt_tokens=later.prompt_tokens, completion_tokens=later.completion_tokens,
            prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs,
            tool_calls=[*self.tool_calls, *later.tool_calls], stop_sequence=later.stop_sequence)


def finish_with_calls(reason: FinishReason, has_calls: bool) -> FinishReason:
    """An output that stopped by itself after making tool calls finished with `tool_calls` (OpenAI's rule)."""
    return "tool_calls" if has_calls and reason == "stop" else reason


def whole_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCallDelta]:
    """Tool-call pieces joined into one delta per call, in call order."""
    calls: dict[int, ToolCallDelta] = {}
    for d in deltas:
        call = calls.setdefault(d.index, ToolCallDelta(d.index))
        call.id, call.name = call.id or d.id, call.name or d.name
        call.arguments += d.arguments
    return [calls[i] for i in sorted(calls)]


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    #: The calls the output makes, each whole (`text` is then the content outside them).
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    #: The stop string that ended the output (one of the request's `stop`), when one did.
    stop_sequence: str | None = None


class StreamResult:
    """Collects a stream's chunks into the `GenerationResult` they make (engines' `generate`, the runtime's
    finished hook)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.calls: list[ToolCallDelta] = []
        self.last: GenerationChunk | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.parts.append(chunk.text)
        self.calls.extend(chunk.tool_calls)
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs = self.prompt_logprobs or chunk.prompt_logprobs
        self.last = chunk

    def result(self) -> GenerationResult | None:
        """The result, or None while no chunk has finished the stream."""
        last = self.last
        if last is None or last.finish_reason is None:
            return None
        return GenerationResult(
            text="".join(self.parts), finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens or 0,
            completion_tokens=last.completion_tokens or 0, logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs, tool_calls=whole_calls(self.calls),
            stop_sequence=last.stop_sequence)


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter as an engine loads it: a checked PEFT folder (`jarvis.adapters.inspect_adapter`)."""

    name: str
    path: str
    base_model: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    use_dora: bool = False
    loaded_at: int = field(default_factory=lambda: int(time.time()))
    #: Loaded by a service for its own use under an unguessable name (the Tinker service's sampler weights):
    #: served when asked for by name, never listed in /v1/models, and listed elsewhere to admin keys only.
    private: bool = False
    #: With `private`: the only client (`RequestContext.client`, a key's label) whose requests it serves; None:
    #: any client's that names it.
    owner: str | None = None

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("private", "owner")}


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
    path: str | None = None
    architecture: str | None = None
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    owned_by: str = "jarvis"
    #: Token ids run from 0 to vocab_size - 1 (None: the engine does not know, e.g. a remote one).
    vocab_size: int | None = None


@dataclass(frozen=True)
class EmbeddingRequest:
    """Inputs to embed, one vector each (`Engine.embed`). `inputs` are as the client sent them (texts or
    token ids): what an engine that does not count tokens (an upstream) passes on; the runtime fills
    `token_ids` for an engine that does (tokenized, in the vocabulary, within the context window)."""

    model: str
    inputs: list[str | list[int]]
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None
    #: Always None today: embeddings come from the base model (an adapter is refused with a 400).
    adapter: str | None = None
    context: RequestContext = field(default_factory=RequestContext, compare=False)

    @property
    def request_id(self) -> str:
        return self.context.request_id


@dataclass
class EmbeddingResult:
    """One vector per input, in input order (unit length from a local engine), and the tokens read."""

    embeddings: list[list[float]]
    prompt_tokens: int


@dataclass
class EngineStats:
    """Counters an operator (and the disconnect test) can watch through /health. The runtime counts the
    requests and tokens of every engine alike (`EngineRuntime._engine_stream`); an engine counts its
    forward passes."""

    requests_started: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    tokens_generated: int = 0
    #: Model forward passes (prefill or decode steps); batching engines run fewer than requests × tokens.
    forward_passes: int = 0

    @property
    def in_flight(self) -> int:
        return self.requests_started - self.requests_finished


Emit = Callable[[GenerationChunk | BaseException], None]

_held = threading.local()  # this thread's emits held by batched_emits(): {loop: [(queue, item), ...]}


@contextlib.contextmanager
def batched_emits() -> Iterator[None]:
    """Hold the chunks this thread emits through WorkerRelays inside the block, and hand them to each event loop
    in one call at its end, in order: a worker that answers many requests per step (a batch's rows) then wakes
    the loop once a step, not once a row. Nested blocks join the outer one."""
    if getattr(_held, "calls", None) is not None:
        yield
        return
    _held.calls = {}
    try:
        yield
    finally:
        calls, _held.calls = _held.calls, None
        for loop, items in calls.items():
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class WorkerRelay:
    """Carries chunks from an engine's worker thread to the request's async generator.

    The worker calls `emit(chunk)` (thread-safe) and checks `cancelled`; the
    request iterates `chunks()`, which merges what piled up while the client
    was slow, re-raises a worker's exception, and on exit — finished, failed
    or abandoned by a disconnecting client — sets `cancelled`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: GenerationChunk | BaseException) -> None:
        held = getattr(_held, "calls", None)
        if held is not None:  # inside batched_emits(): delivered with the rest at the block's end
            held.setdefault(self._loop, []).append((self._queue, item))
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        finished = False
        try:
            while not finished:
                item = await self._queue.get()
                while isinstance(item, GenerationChunk) and item.finish_reason is None and not self._queue.empty():
                    later = self._queue.get_nowait()
                    item = later if isinstance(later, BaseException) else item.then(later)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self.cancelled.set()


class Engine:
    """Base class of every engine delegate."""

    name: str = "engine"
    #: True when the engine renders chat itself from `messages` (the model's template).
    applies_chat_template: bool = False
    #: True when the engine takes `tool_use` as it is and returns the calls itself (an upstream server).
    handles_tools: bool = False
    #: False when the engine cannot tokenize locally (a remote server): the context check is then its job.
    counts_tokens: bool = True
    #: True when `tokenize` spends its time outside the GIL (a Hugging Face fast tokenizer, whose batch encode
    #: is Rust with the GIL released): a long prompt is then prepared on a worker thread (`Runtime.off_loop`).
    tokenizer_releases_gil: bool = False
    #: The optional features it honours: names from SAMPLING_FEATURES and CONSTRAINT_FEATURES. A request
    #: that asks for another is refused with a 400 naming the field and the engine, never run without it.
    supports: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.stats = EngineStats()

    def compile_constraint(self, constraint: OutputConstraint) -> object:
        """The engine's form of `constraint` (a grammar, a matcher factory), made before the request is
        admitted; raise `ValueError` with the reason when it cannot be compiled (the client gets a 400)."""
        return constraint

    async def start(self) -> None:
        """Load the model. Raise `ConfigError` for a bad setting."""

    async def stop(self) -> None:
        """Release the model."""

    def model_info(self) -> ModelInfo:
        raise NotImplementedError

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens written out."""
        raise NotImplementedError

    def stream(self, request: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        raise NotImplementedError

    async def generate(self, request: PreparedRequest) -> GenerationResult:
        collected = StreamResult()
        async for chunk in self.stream(request):
            request.mark_first_token(chunk)
            collected.add(chunk)
        result = collected.result()
        if result is None:
            raise RuntimeError(f"engine {self.name} ended a stream without a finish reason")
        return result

    # Adapter API (LoRA). The runtime validates the folder and owns the list of served adapters;
    # an engine only makes the weights available under `adapter.name` (and `request.adapter` picks them).
    async def load_adapter(self, adapter: AdapterInfo) -> None:
        raise NotImplementedError(f"the {self.name} engine does not serve LoRA adapters")

    async def unload_adapter(self, name: str) -> None:
        raise NotImplementedError(f"the {self.name} engine does not serve LoRA adapters")

    def embedding_info(self) -> dict[str, Any] | None:
        """How `embed` makes its vectors, for `GET /v1/engine`: {"pooling", "normalize", "dimensions", ...};
        None: the engine serves no embeddings (the runtime then answers a 400)."""
        return None

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vector per input. A local engine takes `request.token_ids`, pools the final (post-norm) hidden
        state of every token by its mean and L2-normalises it (`jarvis.embeddings.EMBEDDING_METHOD`), with no
        LM head, off the event loop."""
        raise NotImplementedError(f"the {self.name} engine does not serve embeddings")

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/engine` shows beyond the model: dtype, device, batching, limits."""
        return {}

    @property
    def waiting(self) -> int:
        """Requests the engine holds that wait for a slot of its own (a free context, a batch row)."""
        return 0

    def health_problem(self) -> str | None:
        """Why the engine can no longer serve (the runtime then restarts it); None while it is healthy."""
        return None
