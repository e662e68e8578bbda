"""What an upstream's failure becomes for the client, and which failures another upstream may retry.

An upstream's error answer keeps its status and message, except the ones that are Jarvis's own problem (its
credentials, the upstream failing: 502); a connection that fails is a 503 naming the upstream; a stream that
breaks is a 502 saying how. `score_failure` also scores the attempt that failed, so the pool's circuit breakers
see the same failures the client does. Both the engine (requests) and the monitor (adapter calls) map errors here.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from jarvis.backends.upstream.pool import Attempt
from jarvis.errors import APIError, EngineUnavailable


def upstream_error(response_status: int, body: bytes | str, url: str) -> APIError:
    """The upstream's error, keeping its message; statuses that are Jarvis's own problem become 502."""
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        error, message = {}, None
    message = message or (body.decode(errors="replace") if isinstance(body, bytes) else str(body))[:500]
    if response_status in (401, 403):
        return APIError(f"The upstream {url} refused Jarvis's credentials ({response_status}): {message}. "
                        f"Set JARVIS_UPSTREAM_API_KEY.", status_code=502, error_type="upstream_error",
                        code="upstream_auth")
    if response_status >= 500:
        return APIError(f"The upstream {url} failed ({response_status}): {message}", status_code=502,
                        error_type="upstream_error", code="upstream_error")
    return APIError(message, status_code=response_status, param=error.get("param") if isinstance(error, dict) else None,
                    code=error.get("code") if isinstance(error, dict) else None,
                    error_type=(error.get("type") if isinstance(error, dict) else None) or "invalid_request_error")


def unreachable(url: str, exc: Exception) -> EngineUnavailable:
    return EngineUnavailable(f"The upstream {url} is unreachable ({type(exc).__name__}: {exc}).",
                             code="upstream_unreachable")


class RetryableAnswer(APIError):
    """A 502/503 the upstream answered before any body: another upstream may take the request."""


def answer_error(status: int, body: bytes, url: str) -> APIError:
    """An upstream's error answer to a request; a 502/503 as a `RetryableAnswer`."""
    error = upstream_error(status, body, url)
    if status in (502, 503):
        return RetryableAnswer(error.message, status_code=error.status_code, error_type=error.error_type,
                               code=error.code)
    return error


#: What the request path's client (aiohttp) raises when an exchange with an upstream fails: no answer, or a
#: broken one (its timeouts are TimeoutErrors).
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


def stalled(exc: BaseException) -> bool:
    """A timeout once connected: the upstream may still be working on the request (not down, not retried)."""
    return isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError)


def retryable(exc: BaseException) -> bool:
    """Whether the request may go to another upstream (when nothing reached the client yet): the connection
    failed or broke before an answer, or a 502/503 came back."""
    if isinstance(exc, RetryableAnswer):
        return True
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)) and not stalled(exc)


def score_failure(attempt: Attempt, exc: Exception) -> APIError:
    """Score a failed attempt; the error the client gets if it is not retried."""
    if isinstance(exc, TRANSPORT_ERRORS):
        attempt.failed(f"{type(exc).__name__}: {exc}", down=not stalled(exc))
        return unreachable(attempt.upstream.url, exc)
    assert isinstance(exc, APIError)
    if exc.status_code >= 500 or exc.error_type == "upstream_error":
        attempt.failed(exc.message)
    else:
        attempt.succeeded()  # a client error is the upstream working
    return exc


def stream_error_event(url: str, problem: dict[str, Any]) -> APIError:
    """An error event inside the upstream's stream."""
    return APIError(f"The upstream {url} failed: {problem.get('message', 'error')}",
                    status_code=502, error_type="upstream_error", code=problem.get("code"))


def stream_unfinished(url: str) -> APIError:
    """The upstream's stream ended with no finishing chunk."""
    return APIError(f"The upstream {url} ended the stream without finishing",
                    status_code=502, error_type="upstream_error", code="upstream_incomplete")


def broke_off(url: str, exc: Exception) -> APIError:
    """The upstream went away after part of the answer reached the client: it is never sent again."""
    return APIError(f"The upstream {url} went away mid-stream ({type(exc).__name__}: {exc}); "
                    f"the answer is incomplete.", status_code=502, error_type="upstream_error",
                    code="upstream_disconnected")
