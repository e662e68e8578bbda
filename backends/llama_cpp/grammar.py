"""Grammar-constrained sampling for llama.cpp that checks the sampled token, not the whole vocabulary.

llama-cpp-python puts the grammar sampler inside the sampler chain, so every step matches all of the
vocabulary (262k tokens for Gemma 3, about 30 ms a step here) against the grammar's stacks before top-k
even runs: constrained decoding was 0.3× the unconstrained speed. llama.cpp's own server
(`common_sampler_sample`) samples first and asks the grammar about that one token; only when the
grammar rejects it does it mask the whole vocabulary and run the chain again. Jarvis does the same, with
a cheaper second step before the whole-vocabulary mask: the grammar masks only the most likely tokens
(a head of 2,048, then 16,384: `HEADS`), and the next token comes from those plus an exact account of
the rest:

- greedy: the best accepted token of the head is the best accepted token of the vocabulary, since
  every other token has a lower logit;
- sampled: rejection sampling over "the accepted head tokens, with their probabilities, plus every
  token outside the head, with theirs"; a draw outside the head is checked on its own and, if the
  grammar rejects it, drawn again. That is exactly the distribution renormalised over the accepted
  tokens, and the head usually holds nearly all of it, so the first draw is nearly always kept.

Only when no head holds an accepted token (greedy), the draws keep failing (`DRAWS`), or the chain
truncated the candidates (top-k, top-p or min-p set: those cut after the mask, as in llama.cpp) does the
grammar mask the whole vocabulary.

`GrammarCheckedSampler` wraps a request's sampler chain (`slots.SamplerChain`) whenever it has a grammar.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import LlamaGrammar

#: Most likely tokens the grammar masks at once after it rejected the first pick: a small head, then a
#: larger one, then (`_masked`) the whole vocabulary.
HEADS = (2048, 16384)
#: Rejection-sampling draws before the whole vocabulary is masked.
DRAWS = 16

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class GrammarCheckedSampler:
    """A sampler chain checked against a grammar: `sample(ctx, idx)` returns the next token from row `idx`
    of the context's logits and accepts it into both the chain (penalties keep their history) and the
    grammar."""

    def __init__(self, chain: Any, vocab: Any, grammar: LlamaGrammar, n_vocab: int, *, greedy: bool,
                 seed: int) -> None:
        self.chain = chain  # the request's chain (`slots.SamplerChain`), without the grammar
        self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode(), grammar._root.encode())
        if not self.grammar:
            raise ValueError("llama.cpp could not parse the grammar")
        self.n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._buffer = (llama_cpp.llama_token_data * n_vocab)()
        self._rows = np.frombuffer(self._buffer, dtype=_TOKEN_DATA)
        self._single = llama_cpp.llama_token_data()
        self._head_buffer = (llama_cpp.llama_token_data * max(HEADS))()
        self._head_rows = np.frombuffer(self._head_buffer, dtype=_TOKEN_DATA)
        self.greedy = greedy
        self.rng = np.random.default_rng(seed & 0xFFFFFFFF)
        self.resampled = 0  # steps where the grammar rejected the first pick
        self.masked = 0  # of those, steps that needed the whole-vocabulary mask

    def _candidates(self, logits: np.ndarray) -> llama_cpp.llama_token_data_array:
        # Samplers sort and truncate in place: every pass starts from the logits again.
        self._rows["id"] = self._ids
        self._rows["logit"] = logits
        self._rows["p"] = 0.0
        return llama_cpp.llama_token_data_array(data=self._buffer, size=self.n_vocab, selected=-1, sorted=False)

    def _pick(self, candidates: llama_cpp.llama_token_data_array) -> int:
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def _allowed(self, token: int) -> bool:
        self._single.id, self._single.logit, self._single.p = token, 0.0, 0.0
        one = llama_cpp.llama_token_data_array(data=ctypes.pointer(self._single), size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(one))
        return not math.isinf(one.data[0].logit)

    def _accepted(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` (at most max(HEADS)) the grammar accepts next: one pass of the grammar sampler."""
        rows = self._head_rows[: ids.size]
        rows["id"], rows["logit"], rows["p"] = ids, 0.0, 0.0
        head = llama_cpp.llama_token_data_array(data=self._head_buffer, size=ids.size, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(head))
        return np.isfinite(rows["logit"])

    def _masked(self, logits: np.ndarray) -> int:
        """llama.cpp's path: the grammar masks the whole vocabulary, then the chain samples."""
        self.masked += 1
        candidates = self._candidates(logits)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        return self._pick(candidates)

    def _resample(self, candidates: llama_cpp.llama_token_data_array, logits: np.ndarray) -> int:
        """The next token after the grammar rejected the chain's pick (see the module docstring)."""
        if candidates.size < self.n_vocab:
            return self._masked(logits)
        rows = np.ctypeslib.as_array(candidates.data, shape=(candidates.size,))
        keys = rows["logit"]  # what the chain left: temperature-scaled when sampling
        for size in HEADS:
            if size >= keys.size:
                break
            head = np.argpartition(-keys, size - 1)[:size]
            accepted = head[self._accepted(rows["id"][head])]
            if self.greedy:
                if accepted.size:
                    return int(rows["id"][accepted[np.argmax(keys[accepted])]])
                continue
            token = self._draw(rows, head, accepted)
            if token is not None:
                return token
        return self._masked(logits)

    def _draw(self, rows: np.ndarray, head: np.ndarray, accepted: np.ndarray) -> int | None:
        """Rejection sampling from the accepted head tokens plus every token outside the head, each with its
        probability; None after `DRAWS` rejected draws."""
        weights = rows["p"]  # the chain's dist sampler left the softmax here
        inside = np.cumsum(weights[accepted], dtype=np.float64)
        inside_mass = inside[-1] if inside.size else 0.0
        outside: np.ndarray | None = None  # built only when a draw falls outside the head
        outside_mass = max(float(weights.sum(dtype=np.float64) - weights[head].sum(dtype=np.float64)), 0.0)
        for _ in range(DRAWS):
            draw = self.rng.random() * (inside_mass + outside_mass)
            if draw < inside_mass:
                return int(rows["id"][accepted[min(np.searchsorted(inside, draw, side="right"), inside.size - 1)]])
            if outside is None:
                rest = weights.astype(np.float64)
                rest[head] = 0.0
                outside = np.cumsum(rest)
            if outside[-1] <= 0.0:
                return None
            token = int(rows["id"][min(np.searchsorted(outside, self.rng.random() * outside[-1], side="right"),
                                       outside.size - 1)])
            if self._allowed(token):
                return token
        return None

    def sample(self, ctx: Any, idx: int = -1) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        candidates = self._candidates(logits)
        token = self._pick(candidates)
        if not self._allowed(token):
            self.resampled += 1
            token = self._resample(candidates, logits)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain.sampler, token)
        return token

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain.sampler, token)

    def reset(self) -> None:
        llama_cpp.llama_sampler_reset(self.grammar)
        self.chain.reset()

    def close(self) -> None:
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        self.chain.close()

    def __del__(self) -> None:
        self.close()


# --- JSON Schema → GBNF -----------------------------------------------------------------------------

#: Keywords llama-cpp-python's schema converter would drop without a word; Jarvis enforces the integer
#: bounds itself (`_integer_range`) and refuses the rest, so that no bound goes silently unenforced.
UNENFORCED_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """A GBNF grammar for a JSON Schema: llama-cpp-python's converter, with integer ranges enforced.
    ValueError names what cannot be enforced."""
    from llama_cpp.llama_grammar import SchemaConverter

    class RangedConverter(SchemaConverter):
        def visit(self, schema: Any, name: str) -> str:
            if isinstance(schema, dict) and any(k in schema for k in UNENFORCED_NUMBER_KEYWORDS):
                if schema.get("type") != "integer":
                    raise ValueError(f"`{next(k for k in UNENFORCED_NUMBER_KEYWORDS if k in schema)}` is "
                                     f"enforced on integers only by this engine")
                if "multipleOf" in schema:
                    raise ValueError("`multipleOf` is not enforced by this engine")
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, f"({_integer_range(schema)}) space")
            return super().visit(schema, name)

    from llama_cpp.llama_grammar import RESERVED_NAMES

    converter = RangedConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "schema"), "")
    return converter.format_grammar()


def _integer_range(schema: dict[str, Any]) -> str:
    """GBNF for the integers a schema's minimum / maximum / exclusive bounds allow (JSON: no leading zeros,
    no "-0")."""
    low = high = None
    if "minimum" in schema:
        low = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema:
        low = max(low if low is not None else -math.inf, math.floor(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        high = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema:
        high = min(high if high is not None else math.inf, math.ceil(schema["exclusiveMaximum"]) - 1)
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer lies between the schema's bounds ({low} > {high})")
    parts = []
    if low is None or low < 0:  # the negative part: "-" then |value| in [max(1, -high), -low]
        parts.append('"-" (' + _natural_range(max(1, -high) if high is not None and high < 0 else 1,
                                             None if low is None else -low) + ")")
    if high is None or high >= 0:
        parts.append(_natural_range(max(low, 0) if low is not None else 0, high))
    return " | ".join(f"({p})" for p in parts)


#: The longest integer the stock converter writes (its `integral-part`): 16 digits.
_MAX_DIGITS = 16


def _natural_range(low: int, high: int | None) -> str:
    """GBNF for the decimal numerals of low..high (high None: unbounded, up to 16 digits)."""
    top = 10 ** _MAX_DIGITS - 1 if high is None else high
    alternatives = []
    for length in range(len(str(low)), len(str(top)) + 1):
        first = low if length == len(str(low)) else 10 ** (length - 1)
        last = top if length == len(str(top)) else 10 ** length - 1
        alternatives.append(_same_length_range(str(first), str(last)))
    return " | ".join(f"({a})" for a in alternatives)


def _same_length_range(low: str, high: str) -> str:
    """GBNF for the numerals low..high of one length, digit by digit."""
    if low == high:
        return f'"{low}"'
    if len(low) == 1:
        return f"[{low}-{high}]"
    if low[0] == high[0]:
        return f'"{low[0]}" ({_same_length_range(low[1:], high[1:])})'
    rest = len(low) - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return f"[{low[0]}-{high[0]}] [0-9]{{{rest}}}"
    parts = [f'"{low[0]}" ({_same_length_range(low[1:], "9" * rest)})']
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}] [0-9]{{{rest}}}")
    parts.append(f'"{high[0]}" ({_same_length_range("0" * rest, high[1:])})')
    return " | ".join(parts)
