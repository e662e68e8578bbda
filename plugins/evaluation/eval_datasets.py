"""Evaluation inputs: texts to score for perplexity, and task cases with their expected results.

Perplexity data is a `.txt` file (one text, scored with the stride when long)
or JSONL/JSON/CSV records: `{"text": ...}` scores the whole text; the records
the training plugin reads (`instruction`/`output`, `prompt`/`response`,
`messages`) are rendered by a chat format exactly as for training, and only
the response is scored, given its prompt.

A task case is a record with a `prompt` (raw completion text) or an
`instruction` / `messages` (a chat turn), an `expected` result (else its
`output`/`response`), and `check`: one name or a list of `exact`,
`contains`, `regex`, `numeric`, `json`, `rouge` (default: exact and rouge);
`pattern` overrides the regex, `tolerance` the numeric tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jarvis.chat_format import ChatFormat
from jarvis.plugins.evaluation.task_metrics import CHECKS

DEFAULT_CHECKS = ("exact", "rouge")


@dataclass(frozen=True)
class ScoringText:
    """`context` is given, `target` is scored (context "" scores the whole text but its first token)."""

    id: str
    context: str
    target: str

    @property
    def text(self) -> str:
        return self.context + self.target


@dataclass
class TaskCase:
    id: str
    prompt: str | None  # raw completion prompt
    messages: list[dict[str, str]] | None  # a chat turn (rendered by the server or a chat format)
    expected: Any
    checks: list[str]
    options: dict[str, Any] = field(default_factory=dict)  # pattern, tolerance


class EvalDataError(ValueError):
    """The file cannot be used as evaluation data; the message names the record and the fix."""


def _records(path: Path) -> list[Any]:
    from jarvis.plugins.training.datasets import load_records

    records = load_records(path)
    bad = [(r.id, r.problem) for r in records if r.problem]
    if bad:
        raise EvalDataError(f"{path}: " + "; ".join(f"{i}: {p}" for i, p in bad))
    return records


def needs_chat_format(path: Path) -> bool:
    """Whether some record of `path` must be rendered by a chat format to be scored."""
    if path.suffix == ".txt":
        return False
    return any("text" not in r.fields for r in _records(path))


def load_scoring_texts(path: str | Path, chat_format: ChatFormat | None = None) -> list[ScoringText]:
    from jarvis.plugins.training.datasets import record_example

    path = Path(path)
    if path.suffix == ".txt":
        return [ScoringText(path.stem, "", path.read_text())]
    out = []
    for record in _records(path):
        if isinstance(record.fields.get("text"), str):
            out.append(ScoringText(record.id, "", record.fields["text"]))
            continue
        if chat_format is None:
            raise EvalDataError(f"{path}: record {record.id} is a chat/instruction record; "
                                "name a chat format (--chat-format gemma, chatml, ...) to render it")
        kind, example = record_example(record, chat_format)
        if isinstance(example, str):
            raise EvalDataError(f"{path}: record {record.id}: {example}")
        out.append(ScoringText(record.id, example.prompt, example.response))
    if not out:
        raise EvalDataError(f"{path}: no records to score")
    return out


def load_task_cases(path: str | Path) -> list[TaskCase]:
    path = Path(path)
    cases = []
    for record in _records(path):
        f = dict(record.fields)
        prompt = f.get("prompt") if isinstance(f.get("prompt"), str) else None
        messages = None
        if isinstance(f.get("messages"), list):
            messages = [m for m in f["messages"] if isinstance(m, dict) and m.get("role") != "assistant"]
        elif isinstance(f.get("instruction"), str):
            user = f["instruction"] + (f"\n\n{f['input']}" if f.get("input") else "")
            messages = [{"role": "user", "content": user}]
        expected = next((f[k] for k in ("expected", "output", "response", "completion") if k in f), None)
        if prompt is None and messages is None:
            raise EvalDataError(f"{path}: case {record.id} has no 'prompt', 'instruction' or 'messages'")
        if expected is None:
            raise EvalDataError(f"{path}: case {record.id} has no 'expected' (or 'output') result")
        checks = f.get("check") or f.get("checks") or list(DEFAULT_CHECKS)
        checks = [checks] if isinstance(checks, str) else list(checks)
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            raise EvalDataError(f"{path}: case {record.id}: unknown check {unknown}; use {', '.join(CHECKS)}")
        options = {k: f[k] for k in ("pattern", "tolerance") if k in f}
        cases.append(TaskCase(record.id, prompt, messages, expected, checks, options))
    if not cases:
        raise EvalDataError(f"{path}: no task cases")
    return cases
