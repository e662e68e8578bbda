"""Rules every engine applies the same way: the context length a model was trained for, and which echoed prompt
token gets no score.

Each rule is written once here and called by every engine that needs it, so llama.cpp, transformers and vLLM
cannot drift apart. Nothing heavy is imported: the engines pass in what they read from their own model.
"""

from __future__ import annotations

from collections.abc import Sequence

from jarvis.errors import ConfigError


def context_length_problem(max_model_len: int, trained: int | None,
                           setting: str = "JARVIS_MAX_MODEL_LEN") -> ConfigError | None:
    """The problem with serving `max_model_len` tokens of context from a model trained for `trained` (unknown:
    none), naming `setting`, the setting the length came from; None when it fits."""
    if trained and max_model_len > trained:
        return ConfigError(setting, max_model_len, f"the model was trained for {trained} tokens of context",
                           f"set {setting} to at most {trained}")
    return None


def check_context_length(max_model_len: int, trained: int | None, setting: str = "JARVIS_MAX_MODEL_LEN") -> None:
    """Raise `context_length_problem`'s ConfigError when `max_model_len` exceeds what the model was trained for."""
    problem = context_length_problem(max_model_len, trained, setting)
    if problem is not None:
        raise problem


def skips_leading_bos(ids: Sequence[int], bos_id: int | None, score_bos: bool) -> bool:
    """Whether an echoed prompt's first token is left out of its logprobs: a BOS the server added is context,
    not prompt text. With `score_bos` (the client sent the BOS itself) it stays, as the first token, unscored."""
    return bool(ids) and bos_id is not None and ids[0] == bos_id and not score_bos
