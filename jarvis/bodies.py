"""JSON request bodies → `jarvis.protocol` models; a body that does not fit is the 400 OpenAI would give.

An unknown field is OpenAI's "Unrecognized request argument supplied" naming it (ignoring it would silently
change what was asked for); any other invalid value names the field at fault, or the place inside a part of
a body (`input[2].role`) when the Responses translation validates items one by one.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from jarvis.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes, model: type[M]) -> M:
    """The raw bytes of a request body as `model`."""
    return validate_body(decode_json(raw), model)


def decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def validate_body(data: Any, model: type[M], where: str | None = None) -> M:
    """Validate a decoded JSON body into `model`, raising the 400 the HTTP route would return. `where`:
    the place of a part of a body (`input[2]`); its errors then name the place inside it (`input[2].role`)."""
    if not isinstance(data, dict):
        if where is not None:
            raise InvalidRequest(f"Invalid value for '{where}': expected a JSON object.", param=where,
                                 code="invalid_value")
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = [e for e in errors if e["type"] == "extra_forbidden"]
        first = (unknown or errors)[0]
        if where is None:
            param = ".".join(str(p) for p in first["loc"]) or None
        else:
            param = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        if unknown:  # OpenAI's own words for a field it does not know
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}. Jarvis does not support it; "
                                 "remove it (ignoring it would silently change what was asked for).",
                                 param=param, code="unrecognized_argument") from None
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}" if param else first["msg"],
                             param=param, code="invalid_value") from None
