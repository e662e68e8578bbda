"""Validated wire bodies → the engine-neutral options of a `GenerationRequest`.

`generation_options` maps the sampling fields and the one output constraint a body (validated by
`jarvis.bodies`) may ask for (`response_format`, or vLLM's `structured_outputs` / `guided_*`) onto `GenerationRequest`
keyword arguments; whether the engine can honour them is the runtime's check.
"""

from __future__ import annotations

import json
from typing import Any

from jarvis import protocol as wire
from jarvis.engine import OutputConstraint, ToolUse
from jarvis.errors import InvalidRequest


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{param} is not valid JSON: {exc}", param=param, code="invalid_value") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object.", param=param, code="invalid_value")
    return value


def output_constraint(body: wire._SamplingRequest) -> OutputConstraint | None:
    """The one constraint the body asks for; several at once is a 400."""
    found: list[OutputConstraint] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(OutputConstraint("json_object", None, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequest("response_format of type json_schema needs json_schema.schema.",
                                 param="response_format.json_schema", code="invalid_value")
        found.append(OutputConstraint("json_schema", fmt.json_schema.schema_, "response_format"))
    so = body.structured_outputs
    if so is not None:
        given = [k for k in ("json_", "regex", "choice", "json_object") if getattr(so, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequest("structured_outputs takes exactly one of json, regex, choice, json_object.",
                                 param="structured_outputs", code="invalid_value")
        if so.json_ is not None:
            found.append(OutputConstraint("json_schema", _schema(so.json_, "structured_outputs.json"),
                                          "structured_outputs"))
        elif so.regex is not None:
            found.append(OutputConstraint("regex", so.regex, "structured_outputs"))
        elif so.choice is not None:
            if not so.choice or any(not c for c in so.choice):
                raise InvalidRequest("structured_outputs.choice must list non-empty strings.",
                                     param="structured_outputs.choice", code="invalid_value")
            found.append(OutputConstraint("choice", tuple(so.choice), "structured_outputs"))
        else:
            found.append(OutputConstraint("json_object", None, "structured_outputs"))
    if body.guided_json is not None:
        found.append(OutputConstraint("json_schema", _schema(body.guided_json, "guided_json"), "guided_json"))
    if body.guided_regex is not None:
        found.append(OutputConstraint("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        found.append(OutputConstraint("choice", tuple(body.guided_choice), "guided_choice"))
    if len(found) > 1:
        raise InvalidRequest(f"Only one output constraint per request; got {', '.join(c.param for c in found)}.",
                             param=found[1].param, code="invalid_value")
    return found[0] if found else None


def generation_options(body: wire._SamplingRequest) -> dict[str, Any]:
    """`GenerationRequest` keyword arguments for the sampling options and the constraint of `body`."""
    return {
        "temperature": body.temperature, "top_p": body.top_p, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "stop": body.stop, "seed": body.seed,
        "top_k": 0 if body.top_k in (None, -1) else body.top_k, "min_p": body.min_p or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "logit_bias": {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
        "constraint": output_constraint(body), "ignore_eos": body.ignore_eos,
    }


def tool_use(body: wire.ChatCompletionRequest) -> ToolUse | None:
    """The functions a chat request offers and how they may be used; what does not add up is a 400."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice requires tools: there is no function to call.", param="tool_choice",
                                 code="invalid_value")
        if body.parallel_tool_calls is not None:
            raise InvalidRequest("parallel_tool_calls is only allowed when tools are specified.",
                                 param="parallel_tool_calls", code="invalid_value")
        _check_history(body)
        return None
    names = [t.function.name for t in body.tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequest(f"tools holds two functions named {name!r}.", param=f"tools[{i}].function.name",
                                 code="invalid_value")
    named = None
    if isinstance(choice, wire.NamedToolChoice):
        named = choice.function.name
        if named not in names:
            raise InvalidRequest(f"tool_choice names {named!r}, which is not among the tools ({', '.join(names)}).",
                                 param="tool_choice", code="invalid_value")
    _check_history(body)
    functions = tuple(t.function.model_dump(exclude_none=True) for t in body.tools)
    kind = "function" if named else (choice or "auto")
    return ToolUse(functions, kind, named, body.parallel_tool_calls is not False)  # type: ignore[arg-type]


def _check_history(body: wire.ChatCompletionRequest) -> None:
    """Every tool message answers a call an earlier assistant message made; call arguments are JSON."""
    calls: set[str] = set()
    for i, m in enumerate(body.messages):
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequest("Only assistant messages carry tool_calls.", param=f"messages[{i}].tool_calls",
                                 code="invalid_value")
        for j, call in enumerate(m.tool_calls or []):
            try:
                json.loads(call.function.arguments)
            except json.JSONDecodeError:
                raise InvalidRequest(f"The arguments of call {call.id!r} are not JSON.",
                                     param=f"messages[{i}].tool_calls[{j}].function.arguments",
                                     code="invalid_value") from None
            calls.add(call.id)
        if m.role == "tool":
            if m.tool_call_id is None:
                raise InvalidRequest("A tool message needs tool_call_id: the id of the call it answers.",
                                     param=f"messages[{i}].tool_call_id", code="invalid_value")
            if m.tool_call_id not in calls:
                raise InvalidRequest(f"messages[{i}] answers tool call {m.tool_call_id!r}, which no earlier "
                                     "assistant message made.", param=f"messages[{i}].tool_call_id",
                                     code="invalid_value")
        elif m.tool_call_id is not None:
            raise InvalidRequest("Only tool messages carry tool_call_id.", param=f"messages[{i}].tool_call_id",
                                 code="invalid_value")


def turn_options(body: wire.ChatCompletionRequest) -> dict[str, Any]:
    """Where the answer begins: a new assistant turn (the default), or the continuation of the last message,
    an assistant turn (`continue_final_message`, vLLM's rules: not with `add_generation_prompt` true)."""
    if not body.continue_final_message:
        return {"add_generation_prompt": body.add_generation_prompt is not False}
    if body.add_generation_prompt:
        raise InvalidRequest("continue_final_message and add_generation_prompt cannot both be true: the answer "
                             "continues the last message instead of opening a new turn.",
                             param="add_generation_prompt", code="invalid_value")
    last = body.messages[-1]
    if last.role != "assistant" or last.tool_calls:
        raise InvalidRequest("continue_final_message continues the last message, which must be an assistant turn "
                             "without tool calls.", param=f"messages[{len(body.messages) - 1}]", code="invalid_value")
    return {"add_generation_prompt": False, "continue_final": True}


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index` of n: its own seed (seed + index), so choices differ yet each is reproducible."""
    return None if seed is None else seed + index
