"""Errors as values a client or an operator can act on.

`APIError` is what a route raises; the app renders it as OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` with its HTTP status.
`ConfigError` is what a bad setting raises at start: it names the setting,
the bad value and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class APIError(Exception):
    """An error the HTTP layer renders in OpenAI's shape."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status_code: int | None = None, error_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        if status_code is not None:
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type

    def to_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status_code = 400


class AuthenticationFailed(APIError):
    status_code = 401
    error_type = "authentication_error"


class NotFound(APIError):
    status_code = 404
    error_type = "not_found_error"


class ContextLengthExceeded(APIError):
    status_code = 400

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the length of the prompt or "
            f"max_tokens, or raise JARVIS_MAX_MODEL_LEN.",
            param="messages", code="context_length_exceeded")


class RateLimited(APIError):
    """429: too many requests in flight or per minute; `Retry-After` says when to come back."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after: float, code: str) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, round(retry_after)))})


class EngineUnavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"


class EngineFailure(APIError):
    status_code = 500
    error_type = "server_error"


class ConfigError(Exception):
    """A setting is wrong: says which, what it was, and how to fix it."""

    def __init__(self, setting: str, value: object, problem: str, fix: str) -> None:
        self.setting, self.value, self.problem, self.fix = setting, value, problem, fix
        super().__init__(f"{setting}={value!r}: {problem}. Fix: {fix}")


class UnknownName(LookupError):
    """A name that is not registered, with the closest registered ones."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind, self.name = kind, name
        self.known = sorted(known)
        self.suggestions = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, self.suggestions))}?" if self.suggestions else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {', '.join(self.known) or '(none)'}")
