"""Task metrics: check one output against its expected result, and aggregate the cases.

Checks (each returns a score in [0, 1]; pass/fail ones give 0 or 1):

- `exact`: equal after normalising as SQuAD does (lower case, punctuation and
  the articles a/an/the removed, whitespace collapsed), end-of-turn markers
  dropped first;
- `contains`: the normalised expected text occurs in the normalised output;
- `regex`: `pattern` (else the expected text) matches somewhere in the output;
- `numeric`: the first number in the output is within `tolerance` (absolute,
  default 1e-6) of the expected number;
- `json`: the output (or its first fenced/braced block) parses as JSON, and
  equals `expected` when that is itself a JSON object or list;
- `rouge`: ROUGE-L F1 between output and expected (rouge-score, stemmed).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
PUNCTUATION = set(string.punctuation)
END_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>")


def normalise(text: Any) -> str:
    text = str(text)
    for marker in END_MARKERS:
        text = text.replace(marker, "")
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def check_exact(output: str, expected: Any, options: dict[str, Any]) -> float:
    return float(normalise(output) == normalise(expected))


def check_contains(output: str, expected: Any, options: dict[str, Any]) -> float:
    return float(normalise(expected) in normalise(output))


def check_regex(output: str, expected: Any, options: dict[str, Any]) -> float:
    pattern = options.get("pattern", str(expected))
    return float(re.search(pattern, output, flags=re.IGNORECASE | re.DOTALL) is not None)


def first_number(text: str) -> float | None:
    match = NUMBER.search(text)
    if not match:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def check_numeric(output: str, expected: Any, options: dict[str, Any]) -> float:
    got = first_number(output)
    want = expected if isinstance(expected, (int, float)) else first_number(str(expected))
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, float(want), rel_tol=0.0, abs_tol=float(options.get("tolerance", 1e-6))))


def parse_json_output(output: str) -> tuple[bool, Any]:
    text = output.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    candidates = [text] + ([fenced.group(1)] if fenced else [])
    braced = re.search(r"[\[{].*[\]}]", text, flags=re.DOTALL)
    if braced:
        candidates.append(braced.group())
    for candidate in candidates:
        try:
            return True, json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
    return False, None


def check_json(output: str, expected: Any, options: dict[str, Any]) -> float:
    ok, value = parse_json_output(output)
    if not ok:
        return 0.0
    if isinstance(expected, (dict, list)):
        return float(value == expected)
    return 1.0


def check_rouge(output: str, expected: Any, options: dict[str, Any]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(str(expected), output)["rougeL"].fmeasure)


CHECKS: dict[str, Callable[[str, Any, dict[str, Any]], float]] = {
    "exact": check_exact, "contains": check_contains, "regex": check_regex,
    "numeric": check_numeric, "json": check_json, "rouge": check_rouge,
}
#: checks scored as pass/fail; `rouge` is a graded overlap and never "fails" a case
BINARY = {"exact", "contains", "regex", "numeric", "json"}


def score_case(output: str, expected: Any, checks: Sequence[str],
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every requested check's score, and `passed`: all pass/fail checks passed."""
    scores = {name: CHECKS[name](output, expected, options or {}) for name in checks}
    binary = [scores[name] for name in checks if name in BINARY]
    return {"scores": scores, "passed": all(s == 1.0 for s in binary) if binary else None}


def aggregate(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per check over the cases that ran it, the pass rate, and the counts."""
    per_check: dict[str, list[float]] = {}
    for case in cases:
        for name, value in case.get("scores", {}).items():
            per_check.setdefault(name, []).append(value)
    judged = [c["passed"] for c in cases if c.get("passed") is not None]
    errors = sum(1 for c in cases if c.get("error"))
    return {"cases": len(cases), "errors": errors,
            "pass_rate": sum(judged) / len(judged) if judged else None,
            "metrics": {name: sum(v) / len(v) for name, v in per_check.items()},
            "counts": {name: len(v) for name, v in per_check.items()}}
