"""The adapter API, the same for every engine: load, unload, list LoRA adapters; describe the engine.

`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and
`POST /v1/unload_lora_adapter {"lora_name"}` take the shapes vLLM's server
uses. A loaded adapter is served under its name: `"model": "<lora_name>"`. On a server with API keys,
loading and unloading change what every key is served, so they need the admin scope (`jarvis.auth`);
who may read `GET /v1/engine` is JARVIS_ENGINE_INFO_ACCESS.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from pydantic import BaseModel, ConfigDict, Field

from jarvis.auth import principal_of
from jarvis.engine import AdapterInfo
from jarvis.routes.openai import parse_body, runtime_of
from jarvis.routes.openapi_docs import json_body


class LoadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)


def listed(request: Request, adapters: dict[str, AdapterInfo]) -> list[AdapterInfo]:
    """The adapters a caller is shown: a service's private ones only to admin keys."""
    admin = principal_of(request).admin
    return [a for a in adapters.values() if admin or not a.private]


class AdapterController(Controller):
    path = "/v1"
    tags = ["Adapters"]

    @post("/load_lora_adapter", status_code=200, summary="Load a PEFT LoRA adapter and serve it under lora_name.",
          operation_class=json_body(LoadLoraAdapter), opt={"access": "admin"})
    async def load(self, request: Request) -> dict[str, Any]:
        body = await parse_body(request, LoadLoraAdapter)
        adapter = await runtime_of(request).load_adapter(body.lora_name, body.lora_path)
        return {"object": "lora_adapter", "status": "loaded", **adapter.public()}

    @post("/unload_lora_adapter", status_code=200, summary="Stop serving an adapter.",
          operation_class=json_body(UnloadLoraAdapter), opt={"access": "admin"})
    async def unload(self, request: Request) -> dict[str, Any]:
        body = await parse_body(request, UnloadLoraAdapter)
        await runtime_of(request).unload_adapter(body.lora_name)
        return {"object": "lora_adapter", "status": "unloaded", "name": body.lora_name}

    @get("/adapters", summary="The adapters being served: name, path, base model, rank, loaded at.")
    async def list_adapters(self, request: Request) -> dict[str, Any]:
        runtime = runtime_of(request)
        return {"object": "list", "base_model": runtime.model_id,
                "data": [a.public() for a in listed(request, runtime.adapters)]}

    @get("/engine", summary="The engine behind the API: name, model, dtype, device, batching, adapters.",
         opt={"access_setting": "engine_info_access"})
    async def engine(self, request: Request) -> dict[str, Any]:
        runtime = runtime_of(request)
        info = runtime.require_ready()
        return {"engine": runtime.engine.name, "model": runtime.model_id, "model_path": info.path,
                "max_model_len": info.max_model_len,
                "adapters": sorted(a.name for a in listed(request, runtime.adapters)),
                **runtime.engine.describe()}
