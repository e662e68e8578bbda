"""Perplexity: which tokens are scored, the strided windows for long texts, and the token-weighted total.

Perplexity is `exp(total NLL / scored tokens)` over a whole dataset: every
scored token weighs the same, so a long text counts for more than a short one
(never a mean of per-text perplexities). The first token of a text has no
context and is never scored (an endpoint reports its logprob as null); for a
record with a prompt, only the tokens of the target after it are scored.

A text longer than `max_length` tokens is scored in windows: the scored
positions 1..n-1 are cut into chunks of `stride` tokens, and each chunk is
predicted by one forward pass over the `max_length` tokens that end with it,
so every token is scored exactly once and with at least
`max_length - stride` tokens of context (`stride < max_length`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: logprobs_fn(window_ids, positions) -> log p(window_ids[p] | window_ids[:p]) for each p in positions
WindowScorer = Callable[[Sequence[int], Sequence[int]], Sequence[float]]


@dataclass
class TextScore:
    """The summed negative log-likelihood of one text's scored tokens."""

    id: str
    nll: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@dataclass
class PerplexityResult:
    """Token-weighted perplexity over a dataset, and each text's share."""

    model: str
    nll: float = 0.0
    tokens: int = 0
    texts: list[TextScore] = field(default_factory=list)
    source: str = "local"  # local | endpoint
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, score: TextScore) -> None:
        self.texts.append(score)
        self.nll += score.nll
        self.tokens += score.tokens

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "source": self.source, "perplexity": self.perplexity,
                "mean_nll": self.mean_nll, "nll_sum": self.nll, "scored_tokens": self.tokens,
                "texts": len(self.texts), "settings": self.settings,
                "per_text": [{**asdict(t), "perplexity": t.perplexity} for t in self.texts]}


def perplexity_of(scores: Sequence[TextScore]) -> float:
    """exp(sum NLL / sum tokens): the dataset perplexity of several texts."""
    tokens = sum(s.tokens for s in scores)
    return math.exp(sum(s.nll for s in scores) / tokens) if tokens else float("nan")


def check_window(max_length: int, stride: int | None) -> int:
    """The stride to use (default: half the window); raises ValueError when it cannot work."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    stride = stride if stride is not None else max(1, max_length // 2)
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be between 1 and max_length - 1 ({max_length - 1}), got {stride}")
    return stride


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(window_start, first_scored, end) for each forward pass over a text of `n_tokens` tokens.

    The pass sees tokens[window_start:end] and scores positions first_scored..end-1."""
    if n_tokens <= max_length:
        return [(0, 1, n_tokens)] if n_tokens > 1 else []
    out = []
    for first in range(1, n_tokens, stride):
        end = min(first + stride, n_tokens)
        out.append((max(0, end - max_length), first, end))
    return out


def score_token_ids(ids: Sequence[int], scored_from: int, scorer: WindowScorer, max_length: int,
                    stride: int) -> tuple[float, int]:
    """(summed NLL, count) of positions >= max(1, scored_from) of `ids`, window by window."""
    nll, count = 0.0, 0
    start_at = max(1, scored_from)
    for window_start, first, end in windows(len(ids), max_length, stride):
        positions = [p - window_start for p in range(max(first, start_at), end)]
        if not positions:
            continue
        logprobs = scorer(ids[window_start:end], positions)
        nll -= float(sum(logprobs))
        count += len(positions)
    return nll, count


def score_endpoint_logprobs(tokens: Sequence[str], token_logprobs: Sequence[float | None],
                            text_offset: Sequence[int] | None, context_chars: int) -> tuple[float, int]:
    """(summed NLL, count) from an echoed prompt's logprobs: null entries (the first token) are skipped,
    and with a context only tokens starting at or after its last character are scored."""
    nll, count = 0.0, 0
    offsets = text_offset if text_offset is not None else _offsets(tokens)
    for offset, logprob in zip(offsets, token_logprobs):
        if logprob is None or offset < context_chars:
            continue
        nll -= float(logprob)
        count += 1
    return nll, count


def _offsets(tokens: Sequence[str]) -> list[int]:
    out, at = [], 0
    for token in tokens:
        out.append(at)
        at += len(token)
    return out
