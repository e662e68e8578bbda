"""Training data: read JSONL, JSON or CSV records, validate them, render them as prompt/response pairs.

Three record kinds are recognised by their fields:

- `alpaca`: `instruction`, optional `input`, `output`;
- `prompt_response`: `prompt` (or `instruction`) and `response` (or `completion`);
- `chat`: `messages`, a list of `{role, content}` with roles system, user or
  assistant, at least one user turn, and an assistant turn last.

Each valid record becomes an `Example`: the prompt is the conversation up to
the last assistant turn, rendered by a chat format with its generation prompt;
the response is that assistant turn as the format renders it, up to and
including its end-of-turn marker (so the model learns to stop). Earlier
assistant turns of a chat are part of the prompt. An invalid record is
reported with its identifier (its `id` field, else `line N` or `item N`) and
what is wrong with it, so a dataset can be fixed in one pass.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jarvis.chat_format import ChatFormat, ChatFormatError

IGNORE_INDEX = -100  # label of a token that carries no loss (PyTorch's cross-entropy default)
UNRECOGNISED = "unrecognised"  # the kind counted for records that could not be read or classified
ROLES = ("system", "user", "assistant")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

#: tokenize(text, add_special_tokens) -> token ids
Tokenize = Callable[[str, bool], list[int]]


class DatasetError(ValueError):
    """The file cannot be read as a dataset, or (in strict mode) some of its records are invalid."""

    def __init__(self, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        self.problems = list(problems)
        super().__init__(message + "".join(f"\n  {example_id}: {problem}"
                                           for example_id, problem in self.problems))


@dataclass(frozen=True)
class RawRecord:
    """A record as read from the file; `problem` says why it could not be read as an object."""

    id: str
    fields: Mapping[str, Any]
    problem: str | None = None


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str  # up to and including the generation prompt
    response: str  # the assistant text and the format's end-of-turn marker


@dataclass
class DatasetReport:
    examples: list[Example] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (id, problem)
    kinds: Counter[str] = field(default_factory=Counter)  # records per kind, valid or not


# Reading


def load_records(path: str | os.PathLike) -> list[RawRecord]:
    """The records of a `.jsonl`, `.json` or `.csv` file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*JSONL_SUFFIXES, ".json", ".csv"):
        raise DatasetError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                           "use .jsonl (one JSON object a line), .json (a list of objects) "
                           "or .csv (with a header row)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the file as UTF-8 text ({exc})") from None
    if suffix == ".json":
        return _json_records(path, text)
    if suffix == ".csv":
        return _csv_records(text)
    return _jsonl_records(text)


def _jsonl_records(text: str) -> list[RawRecord]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(RawRecord(f"line {number}", {}, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        records.append(_record(value, f"line {number}", "the line"))
    return records


def _json_records(path: Path, text: str) -> list[RawRecord]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    items = value.get("data") if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise DatasetError(f'{path}: expected a list of records or {{"data": [...]}} at the top level, '
                           f"found {_json_type(value)}")
    return [_record(item, f"item {index}", "the item") for index, item in enumerate(items)]


def _csv_records(text: str) -> list[RawRecord]:
    reader = csv.DictReader(io.StringIO(text))
    records = []
    for number, row in enumerate(reader, start=2):  # the header is line 1
        extra = row.pop(None, None)  # cells beyond the header
        fields = {name: value for name, value in row.items() if value is not None}  # None: a short row
        record = _record(fields, f"line {number}", "the row")
        if extra:
            record = RawRecord(record.id, {}, f"has {len(reader.fieldnames) + len(extra)} cells, "
                                              f"but the header names {len(reader.fieldnames)}")
        records.append(record)
    return records


def _record(value: Any, position: str, what: str) -> RawRecord:
    if not isinstance(value, dict):
        return RawRecord(position, {}, f"{what} is {_json_type(value)}, not an object")
    own_id = value.get("id")
    has_id = own_id is not None and str(own_id).strip() != ""
    return RawRecord(str(own_id).strip() if has_id else position, value)


# Validating


def record_kind(fields: Mapping[str, Any]) -> str | None:
    """The kind a record's fields announce (it may still lack some), or None."""
    if "messages" in fields:
        return "chat"
    if "instruction" in fields:
        return "prompt_response" if "response" in fields and "output" not in fields else "alpaca"
    if fields.keys() & {"prompt", "response", "completion"}:
        return "prompt_response"
    if "output" in fields:
        return "alpaca"
    return None


def record_messages(kind: str, fields: Mapping[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The conversation a record holds, and every problem found with it."""
    problems: list[str] = []
    if kind == "chat":
        return _chat_messages(fields.get("messages"), problems), problems
    if kind == "alpaca":
        instruction = _text(fields, "instruction", problems)
        output = _text(fields, "output", problems)
        extra = fields.get("input")
        if extra is not None and not isinstance(extra, str):
            problems.append(f"'input' is {_json_type(extra)} (expected a string)")
        elif extra and extra.strip():
            instruction += "\n\n" + extra
        return _exchange(instruction, output), problems
    prompt_name = "prompt" if "prompt" in fields or "instruction" not in fields else "instruction"
    response_name = "response" if "response" in fields or "completion" not in fields else "completion"
    return _exchange(_text(fields, prompt_name, problems), _text(fields, response_name, problems)), problems


def _exchange(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _text(fields: Mapping[str, Any], name: str, problems: list[str], shown: str | None = None) -> str:
    """A required, non-blank string field; a problem naming it otherwise."""
    shown = shown or name
    if name not in fields:
        problems.append(f"missing field '{shown}'")
        return ""
    value = fields[name]
    if not isinstance(value, str):
        problems.append(f"'{shown}' is {_json_type(value)} (expected a string)")
        return ""
    if not value.strip():
        problems.append(f"'{shown}' is empty")
    return value


def _chat_messages(messages: Any, problems: list[str]) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        problems.append(f"'messages' is {_json_type(messages)} (expected a list of {{role, content}} objects)")
        return []
    if not messages:
        problems.append("'messages' is empty")
        return []
    turns = []
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"'{name}' is {_json_type(message)} (expected an object with role and content)")
            turns.append({"role": None, "content": ""})
            continue
        role = message.get("role")
        if "role" not in message:
            problems.append(f"missing field '{name}.role'")
        elif role not in ROLES:
            problems.append(f"'{name}.role' is {role!r} (expected system, user or assistant)")
        content = _text(message, "content", problems, shown=f"{name}.content")
        turns.append({"role": role, "content": content})
    roles = [turn["role"] for turn in turns]
    if turns and "user" not in roles:
        problems.append("'messages' has no user turn")
    if turns and roles[-1] in ROLES and roles[-1] != "assistant":
        problems.append(f"'messages' ends with a {roles[-1]} turn (the last turn must be the assistant's)")
    return turns


def render_example(example_id: str, messages: list[dict[str, str]], chat_format: ChatFormat) -> Example:
    """The example that trains the last assistant turn of `messages`, as `chat_format` renders it."""
    prompt = chat_format(messages[:-1], True)
    conversation = chat_format(messages, False)
    if not conversation.startswith(prompt):
        raise ChatFormatError("the rendered conversation does not start with the rendered prompt, "
                              "so the assistant turn cannot be told apart")
    turn = conversation[len(prompt):]
    end = max((turn.rfind(stop) + len(stop) for stop in chat_format.stop if stop and stop in turn), default=None)
    if end is None:
        raise ChatFormatError(f"no end-of-turn marker {chat_format.stop} after the assistant turn")
    return Example(example_id, prompt, turn[:end])


def record_example(record: RawRecord, chat_format: ChatFormat) -> tuple[str, Example | str]:
    """The record's kind, and its Example or what is wrong with it."""
    if record.problem:
        return UNRECOGNISED, record.problem
    kind = record_kind(record.fields)
    if kind is None:
        found = ", ".join(repr(name) for name in record.fields if name != "id") or "none"
        return UNRECOGNISED, ("no recognised fields (expected 'messages', 'instruction' and 'output', "
                              f"or 'prompt' and 'response'); found {found}")
    messages, problems = record_messages(kind, record.fields)
    if not problems:
        try:
            return kind, render_example(record.id, messages, chat_format)
        except ChatFormatError as exc:
            problems.append(f"cannot be rendered as {chat_format.name}: {exc}")
    return kind, "; ".join(problems)


def prepare_dataset(path: str | os.PathLike, chat_format: ChatFormat, *, strict: bool = False) -> DatasetReport:
    """Every valid record of `path` as an Example, and every invalid one with its problems.

    In strict mode any invalid record raises a `DatasetError` listing them all."""
    report = DatasetReport()
    for record in load_records(path):
        kind, outcome = record_example(record, chat_format)
        report.kinds[kind] += 1
        if isinstance(outcome, Example):
            report.examples.append(outcome)
        else:
            report.invalid.append((record.id, outcome))
    if strict and report.invalid:
        raise DatasetError(f"{path}: {len(report.invalid)} invalid example(s)", report.invalid)
    return report


# Tokenizing and splitting


def tokenize_example(example: Example, tokenize: Tokenize,
                     max_length: int | None = None) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with the loss on response tokens only; None when `max_length` leaves no response token.

    Only the prompt gets the tokenizer's special tokens (BOS); truncation keeps the left part."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    prompt_ids = tokenize(example.prompt, True)
    response_ids = tokenize(example.response, False)
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def split_eval(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random `fraction` held out for evaluation, each part in file order.

    With fraction > 0 and at least two examples, each part gets at least one."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the eval fraction must be in [0, 1), got {fraction}")
    count = round(len(examples) * fraction)
    if fraction > 0 and len(examples) >= 2:
        count = min(max(count, 1), len(examples) - 1)
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def _json_type(value: Any) -> str:
    """How JSON would call the value's type, with an article."""
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object",
            type(None): "null"}.get(type(value), f"a {type(value).__name__}")
