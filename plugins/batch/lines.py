"""Batch input lines: parse every line on its own and say exactly what is wrong with a bad one.

A line is `{"custom_id", "method": "POST", "url", "body"}`. Problems with the
line itself (not JSON, no or a repeated custom_id, wrong method or url) become
`{"code", "message"}` errors here; the body is checked later by the server's
own request validation, exactly as the HTTP route would check it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jarvis import protocol as wire
from jarvis import protocol_anthropic as awire
from jarvis import protocol_responses as rwire
from jarvis.bodies import validate_body
from jarvis.errors import InvalidRequest
from jarvis.protocol_embeddings import EmbeddingsRequest

LineBody = (wire.ChatCompletionRequest | wire.CompletionRequest | rwire.ResponsesRequest | EmbeddingsRequest
            | awire.MessagesRequest)

ENDPOINTS: dict[str, type[LineBody]] = {
    "/v1/chat/completions": wire.ChatCompletionRequest,
    "/v1/completions": wire.CompletionRequest,
    "/v1/responses": rwire.ResponsesRequest,
    "/v1/embeddings": EmbeddingsRequest,
    "/v1/messages": awire.MessagesRequest,
}


@dataclass(frozen=True)
class BatchLine:
    line: int  # 1-based line number in the input file: the key of the line's result
    custom_id: str | None
    body: Any = None
    error: dict[str, str] | None = None  # {"code", "message"} when the line itself is malformed


def parse_input(data: bytes, endpoint: str) -> list[BatchLine]:
    """Every non-blank line of `data`, each either well-formed or carrying its error."""
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    for number, raw_bytes in enumerate(data.split(b"\n"), start=1):
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            lines.append(BatchLine(number, None, error={
                "code": "invalid_encoding", "message": f"Line {number}: not UTF-8 text ({exc.reason})."}))
            continue
        if raw.strip():
            parsed = parse_line(number, raw, endpoint, seen)
            if parsed.custom_id is not None:  # the first line naming an id owns it, even if malformed
                seen.setdefault(parsed.custom_id, number)
            lines.append(parsed)
    return lines


def first_endpoint(data: bytes) -> str | None:
    """The url of the first line that names a supported endpoint (what an offline run serves)."""
    for raw in data.split(b"\n"):
        try:
            url = json.loads(raw).get("url")
        except (ValueError, AttributeError):
            continue
        if url in ENDPOINTS:
            return url
    return None


def parse_line(number: int, raw: str, endpoint: str, seen: dict[str, int]) -> BatchLine:
    def bad(code: str, message: str, custom_id: str | None = None) -> BatchLine:
        return BatchLine(number, custom_id, error={"code": code, "message": f"Line {number}: {message}"})

    try:
        item = json.loads(raw)
    except json.JSONDecodeError as exc:
        return bad("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno}).")
    if not isinstance(item, dict):
        return bad("invalid_json", "must be a JSON object with custom_id, method, url and body.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_custom_id", "custom_id is missing or not a non-empty string; every line needs a "
                                        "unique custom_id.")
    if custom_id in seen:
        return bad("duplicate_custom_id", f"custom_id {custom_id!r} is a duplicate of line {seen[custom_id]}; "
                                          "custom_ids must be unique within a batch.", custom_id)
    method = item.get("method")
    if not isinstance(method, str) or method.upper() != "POST":
        return bad("invalid_method", f"method {method!r} is not supported; use \"POST\".", custom_id)
    url = item.get("url")
    if url not in ENDPOINTS:
        return bad("invalid_url", f"url {url!r} is not supported; use one of {', '.join(ENDPOINTS)}.", custom_id)
    if url != endpoint:
        return bad("mismatched_url", f"url {url!r} differs from the batch endpoint {endpoint!r}; every line "
                                     "must use the batch's endpoint.", custom_id)
    return BatchLine(number, custom_id, body=item.get("body"))


def validate_line_body(line: BatchLine, endpoint: str) -> LineBody:
    """The body as the HTTP route would accept it; raises the route's InvalidRequest otherwise."""
    body = validate_body(line.body, ENDPOINTS[endpoint])
    if getattr(body, "stream", False):  # an embeddings body has no stream
        raise InvalidRequest("stream=true is not supported in a batch: each line gets one complete response. "
                             "Remove `stream` or set it to false.", param="stream", code="stream_not_supported")
    return body
