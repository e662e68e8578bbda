"""Output constraints as xgrammar grammars: the check vLLM's structured outputs run (xgrammar is vLLM's
default backend), and the token masks the transformers engine applies per row.

xgrammar was chosen because it is vLLM's own default grammar engine (same behaviour on both engines),
compiles JSON Schema, regular expressions and EBNF, and computes a row's next-token mask on the CPU in
tens of microseconds, so a constrained row costs a mask per step, not a pass over the vocabulary in Python.
Whitespace inside JSON is kept compact: a small base model could otherwise spend its tokens on it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jarvis.engine import OutputConstraint


def grammar_of(constraint: OutputConstraint) -> Any:
    """The xgrammar `Grammar` of `constraint`; ValueError with xgrammar's reason when it has none."""
    import xgrammar as xgr

    try:
        if constraint.kind == "json_object":
            return xgr.Grammar.from_json_schema(json.dumps({"type": "object"}), any_whitespace=False)
        if constraint.kind == "json_schema":
            return xgr.Grammar.from_json_schema(json.dumps(constraint.spec), any_whitespace=False)
        if constraint.kind == "regex":
            return xgr.Grammar.from_regex(constraint.spec)
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in constraint.spec))
    except Exception as exc:  # xgrammar raises RuntimeError / its own errors for what it cannot compile
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ValueError(re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0])) from None  # drop "[time] file:line:"


class TokenMasks:
    """Compiled grammars for one tokenizer, and a matcher per constrained row."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))

    def compile(self, constraint: OutputConstraint) -> Any:
        return self._compiler.compile_grammar(grammar_of(constraint))

    def matcher_factory(self, compiled: Any) -> Any:
        """A callable that makes a fresh `RowMatcher` (one per row: n choices share the compiled grammar)."""
        return lambda: RowMatcher(self._xgr, compiled, self.vocab_size)


class RowMatcher:
    """One row's grammar state: masks its logits before sampling, then accepts the sampled token."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int) -> None:
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: Any) -> Any:
        """`logits` (one row, on any device) with every token the grammar forbids at -inf."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.float().cpu().unsqueeze(0)
        self._xgr.apply_token_bitmask_inplace(row, self._bitmask)
        return row[0].to(logits.device)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} was sampled against the grammar")

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()
