"""A client's request → the request the engine takes: pure functions, no state, no I/O.

`prepare(request, target)` resolves nothing itself: the runtime hands it a `Target` (the engine, its model,
the served model the request names, the chat format) and gets a `PreparedRequest` back or an `APIError`
naming the field at fault. It refuses what the engine cannot honour (never a silent 200), renders chat and
tools with the chat format, decodes a required tool call under the call's JSON schema, compiles the
output constraint, tokenizes, and checks the context window and `max_tokens`. The same rules serve
`/tokenize` and `/detokenize` (`render_chat`, `check_token_ids`, `brings_bos`), so the two never drift.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from jarvis.chat_format import ChatFormat, ChatFormatError
from jarvis.engine import Engine, GenerationRequest, ModelInfo, OutputConstraint, PreparedRequest, ToolUse
from jarvis.errors import ContextLengthExceeded, InvalidRequest
from jarvis.tool_calls import call_schema, convention_messages, parser_for, template_messages, uses_tools


@dataclass(frozen=True)
class ServedModel:
    """A model id the server answers for: the base model, or an adapter on it."""

    id: str
    created: int
    max_model_len: int
    owned_by: str
    adapter: str | None = None


@dataclass(frozen=True)
class Target:
    """What a request is prepared for: the engine that will serve it and that engine's model, the served
    model the request names, the chat format (None when the engine applies the model's own template) and
    the server's `max_tokens` cap (JARVIS_MAX_TOKENS_CAP)."""

    engine: Engine
    info: ModelInfo
    served: ServedModel
    chat_format: ChatFormat | None = None
    max_tokens_cap: int | None = None


def prepare(request: GenerationRequest, target: Target) -> PreparedRequest:
    """The request as the engine takes it, a new one (see the module's docstring)."""
    engine, info = target.engine, target.info
    request = with_call_constraint(request, engine)
    compiled = check_supported(request, engine)
    prompt, stop, ids = request.prompt, tuple(request.stop), request.prompt_token_ids
    reader = None
    if request.kind == "chat" and not engine.applies_chat_template:
        fmt = target.chat_format
        if fmt is None:
            raise ValueError("a chat request for an engine that does not apply the template needs a chat format")
        messages = request.messages or []
        if request.continue_final:  # the assistant's turn is opened, and its beginning is the prompt's end
            prompt = render_chat(fmt, messages[:-1], request.tool_use) + messages[-1]["content"]
        else:
            prompt = render_chat(fmt, messages, request.tool_use, request.add_generation_prompt)
        stop = (*stop, *(s for s in fmt.stop if s not in stop))
        tool_use = request.tool_use
        if tool_use is not None and tool_use.offered:
            reader = parser_for(tool_use, fmt.tool_parser if fmt.tool_prompt else None)
    cap = target.max_tokens_cap
    max_tokens = request.max_tokens
    if cap is not None and max_tokens is not None and max_tokens > cap:
        raise InvalidRequest(f"max_tokens is {max_tokens}, above this server's limit of {cap} "
                             f"(JARVIS_MAX_TOKENS_CAP).", param="max_tokens", code="max_tokens_too_large")
    score_bos = False
    if ids is not None and prompt is None:  # the client sent token ids
        score_bos = True
        check_token_ids(ids, info.vocab_size, "prompt")
        if engine.counts_tokens:
            prompt = engine.detokenize(ids)  # for echo
    elif prompt is not None and brings_bos(prompt, info):
        score_bos = True  # the text brings its own <bos>: never a second one
    if (prompt is not None or ids is not None) and engine.counts_tokens:
        if ids is None:
            ids = engine.tokenize(prompt or "", add_special=not score_bos)
        budget = info.max_model_len - len(ids)
        if max_tokens is None:
            if budget < 1:
                raise ContextLengthExceeded(len(ids), 1, info.max_model_len)
            max_tokens = min(budget, cap or budget)
        elif max_tokens > budget:
            raise ContextLengthExceeded(len(ids), max_tokens, info.max_model_len)
    if max_tokens is None and cap is not None:  # an engine that counts remotely
        max_tokens = cap
    fields = {f: getattr(request, f) for f in GenerationRequest.__dataclass_fields__}
    return PreparedRequest(**{**fields, "prompt": prompt, "stop": stop, "prompt_token_ids": ids,
                              "max_tokens": max_tokens, "context": request.context},
                           adapter=target.served.adapter, compiled_constraint=compiled, tool_reader=reader,
                           score_bos=score_bos)


def with_call_constraint(request: GenerationRequest, engine: Engine) -> GenerationRequest:
    """A required call (tool_choice "required" or a named function) is decoded under the call's JSON schema,
    unless the engine handles tools itself."""
    tool_use = request.tool_use
    if tool_use is None or not tool_use.constrained or engine.handles_tools:
        return request
    if request.constraint is not None:
        raise InvalidRequest(f"{request.constraint.param} cannot be combined with tool_choice "
                             f"{tool_use.choice!r}: the answer is a tool call.", param=request.constraint.param,
                             code="invalid_value")
    return replace(request, constraint=OutputConstraint("json_schema", call_schema(tool_use), "tools"))


def check_supported(request: GenerationRequest, engine: Engine) -> object | None:
    """Refuse what the engine cannot honour (a 400 naming the field); the engine's compiled constraint."""
    asked = {"top_k": request.top_k not in (0, -1), "min_p": request.min_p > 0,
             "repetition_penalty": request.repetition_penalty != 1.0, "logit_bias": bool(request.logit_bias)}
    for feature, used in asked.items():
        if used and feature not in engine.supports:
            raise InvalidRequest(f"`{feature}` is not supported by the {engine.name} engine; omit it or serve "
                                 f"with an engine that has it.", param=feature, code="unsupported_parameter")
    tool_use = request.tool_use
    if tool_use is not None and tool_use.offered and not engine.handles_tools:
        if engine.applies_chat_template:
            raise InvalidRequest(f"tools are not supported by the {engine.name} engine.", param="tools",
                                 code="unsupported_parameter")
        if not tool_use.constrained and request.constraint is not None:
            raise InvalidRequest(f"{request.constraint.param} cannot be combined with tools under tool_choice "
                                 f"auto on the {engine.name} engine: the output would be held to the format and "
                                 f"no call could be made. Use tool_choice required or a named function, or leave "
                                 f"one of them out.", param=request.constraint.param, code="unsupported_parameter")
    constraint = request.constraint
    if constraint is None:
        return None
    kind = constraint.kind.replace("_", " ")
    if constraint.kind not in engine.supports:
        raise InvalidRequest(f"{constraint.param}: constrained decoding to {kind} is not supported by the "
                             f"{engine.name} engine.", param=constraint.param, code="unsupported_parameter")
    try:
        return engine.compile_constraint(constraint)
    except ValueError as exc:
        raise InvalidRequest(f"{constraint.param}: the {engine.name} engine cannot compile this {kind}: {exc}",
                             param=constraint.param, code="invalid_response_format") from None


def render_chat(fmt: ChatFormat, messages: list[dict], tool_use: ToolUse | None,
                add_generation_prompt: bool = True) -> str:
    """The prompt of a chat: plain, or with the functions offered and the calls made so far (the format's own
    tool syntax where it has one, else Jarvis's convention). A conversation the format cannot render is a
    400 naming `messages`."""
    try:
        if tool_use is None and not uses_tools(messages):
            return fmt(messages, add_generation_prompt)
        if fmt.tool_prompt is not None:
            offered = tool_use.offered if tool_use is not None else ()
            return fmt.tool_prompt(template_messages(messages),
                                   [{"type": "function", "function": f} for f in offered], add_generation_prompt)
        return fmt(convention_messages(messages, tool_use), add_generation_prompt)
    except ChatFormatError as exc:
        raise InvalidRequest(f"cannot render the conversation with chat format {fmt.name!r}: {exc}",
                             param="messages") from None


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    """Token ids must lie in the vocabulary: never negative, below `vocab_size` where the engine knows it."""
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        shown = f"0..{vocab_size - 1}" if vocab_size is not None else "0 or more"
        raise InvalidRequest(f"{param} holds token ids outside this model's vocabulary ({shown}): {bad[:5]}",
                             param=param, code="invalid_token_id")


def brings_bos(text: str, info: ModelInfo) -> bool:
    """The text begins with the model's <bos>: tokenize it without adding another."""
    return bool(info.bos_token) and text.startswith(info.bos_token)
