"""The SDK's request types (`tinker.types`), imported when the first Tinker request needs one.

Importing `tinker` imports torch (its `TensorData` converts to and from tensors): about 1.3 s and 190 MB of
every server's start, whatever the engine, though only a training client uses it. So the routes name the
SDK's types and find them at their first request, and the OpenAPI document describes their bodies from
`sdk_schemas.json`: the installed SDK's own JSON schemas, which a test keeps equal to the SDK's. After an
upgrade of the SDK, `python -m jarvis.plugins.tinker.wire_types` writes them again.
"""

from __future__ import annotations

import functools
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).with_name("sdk_schemas.json")

#: The SDK's request types whose JSON bodies the routes parse.
REQUEST_TYPES = ("CreateSessionRequest", "SessionHeartbeatRequest", "CreateModelRequest", "GetInfoRequest",
                 "OptimStepRequest", "SaveWeightsRequest", "SaveWeightsForSamplerRequest", "LoadWeightsRequest",
                 "CreateSamplingSessionRequest", "SampleRequest", "FutureRetrieveRequest")


@functools.cache
def sdk_type(name: str) -> Any:
    """`tinker.types.<name>`, a pydantic model."""
    from tinker import types

    return getattr(types, name)


@functools.cache
def stored_schemas() -> dict[str, Any]:
    """The bodies' JSON schemas, by type name, as the SDK wrote them (no import of the SDK)."""
    return json.loads(SCHEMAS.read_text())["schemas"]


def sdk_schemas() -> dict[str, Any]:
    """What the installed SDK says of them now."""
    return {name: sdk_type(name).model_json_schema() for name in REQUEST_TYPES}


if __name__ == "__main__":
    SCHEMAS.write_text(json.dumps({"sdk_version": version("tinker"), "schemas": sdk_schemas()}, indent=1,
                                  sort_keys=True) + "\n")
    print(f"wrote {SCHEMAS} from tinker {version('tinker')}")
