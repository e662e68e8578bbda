"""The Tinker API over HTTP, under /api/v1, as the official `tinker` SDK calls it.

Bodies are the SDK's own request types (`tinker.types`: an unknown field is a 400 naming it) except
`forward_backward`, a protobuf `ForwardBackwardRequest`. Work requests answer `{"request_id"}` at once;
`retrieve_future` long-polls for the result: `{"type": "try_again"}` while it runs, the result (JSON, or
protobuf for forward/backward and samples), or `{"error", "category"}`. Errors of the request itself are
HTTP errors in Tinker's shape, `{"detail": "..."}`. Every route needs an API key when the server has keys
(the SDK sends it as X-API-Key; its keys start with `tml-`), and each key sees only its own objects.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.exceptions import HTTPException
from litestar.openapi.spec import Operation
from pydantic import BaseModel, ConfigDict, ValidationError

from jarvis.auth import Principal, principal_of
from jarvis.errors import APIError
from jarvis.plugins.tinker.futures import RequestFailed
from jarvis.plugins.tinker.service import TinkerService
from jarvis.plugins.tinker.trainer import LoraSpec
from jarvis.plugins.tinker.wire_types import sdk_type, stored_schemas
from jarvis.routes.openai import client_of
from jarvis.routes.openapi_docs import ERROR_STATUSES, JsonSchema, own_errors_body
from jarvis.server import server_of

CLIENT_CONFIG = {"pjwt_auth_enabled": False, "use_pyqwest_transport": False, "proto_compress_fwdbwd": False,
                 "parallel_fwdbwd_chunks": False, "sample_use_retrieve_futures": False,
                 "sample_join_sampling_session": False, "custom_loss_server_side": False}


DETAIL = JsonSchema({"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]})
ERRORS = {**ERROR_STATUSES, 410: "The session is finished."}


def operation(body: str | type[BaseModel] | None = None) -> type[Operation]:
    """An `operation_class` documenting a Tinker route: its JSON body (the SDK's own request type, by name: its
    schema as stored, `wire_types`) and its errors in Tinker's shape, `{"detail": "..."}`."""
    name = body if isinstance(body, str) else body.__name__ if body else ""
    schema = stored_schemas()[body] if isinstance(body, str) else body.model_json_schema() if body else None
    return own_errors_body(schema, DETAIL, ERRORS, f"Tinker{name}Operation")


def detail(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response({"detail": message}, status_code=status, headers=headers)


def tinker_errors(_: Request, exc: Exception) -> Response:
    """Errors of a Tinker route in Tinker's shape."""
    if isinstance(exc, RequestFailed):
        return detail(exc.message, 400)
    if isinstance(exc, APIError):
        return detail(exc.message, exc.status_code, exc.headers or None)
    if isinstance(exc, HTTPException):  # the framework's own: a bad query parameter, a body too large
        text = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return detail(text, exc.status_code, getattr(exc, "headers", None))
    raise exc


def service_of(request: Request) -> TinkerService:
    service = server_of(request).extensions.get("tinker")
    if service is None:
        raise APIError("The Tinker service is not running (JARVIS_TINKER_ENABLED=false, or the [tinker] extra is "
                       "missing: pip install 'jarvis-llm[tinker]').", status_code=503)
    return service


async def parse(request: Request, model: str | type[BaseModel]) -> Any:
    """The body as `model`: one of ours, or the SDK's type of that name (imported at its first use)."""
    if isinstance(model, str):
        model = sdk_type(model)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:  # an unknown field is named first, as OpenAI does
        first = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestFailed(f"{where}: {first['msg']}") from None


class WeightsInfoRequest(BaseModel):
    """`RestClient.get_weights_info_by_tinker_path`'s body (the SDK has no type of its own for it)."""

    model_config = ConfigDict(extra="forbid")
    tinker_path: str


def future(request_id: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, **extra}


class TinkerController(Controller):
    path = "/api/v1"
    tags = ["Tinker"]
    opt = {"access": "key"}
    exception_handlers = {APIError: tinker_errors, RequestFailed: tinker_errors, HTTPException: tinker_errors}

    # --- client setup --------------------------------------------------------------------------------

    @post("/client/config", status_code=200, operation_class=operation())
    async def client_config(self) -> dict[str, Any]:
        return CLIENT_CONFIG

    @post("/client/dynamic_config", status_code=200, operation_class=operation())
    async def dynamic_config(self) -> dict[str, Any]:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}

    @get("/healthz", operation_class=operation())
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok"}

    @get("/get_server_capabilities", operation_class=operation())
    async def capabilities(self, request: Request) -> dict[str, Any]:
        return service_of(request).capabilities()

    @post("/create_session", status_code=200, operation_class=operation("CreateSessionRequest"))
    async def create_session(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "CreateSessionRequest")
        session_id = await service_of(request).create_session(principal_of(request).owner, list(body.tags))
        return {"session_id": session_id, "type": "create_session"}

    @post("/session_heartbeat", status_code=200, operation_class=operation("SessionHeartbeatRequest"))
    async def heartbeat(self, request: Request) -> Response:
        body = await parse(request, "SessionHeartbeatRequest")
        session = await service_of(request).session(body.session_id, principal_of(request))
        if session["finished_at"] is not None:
            return detail(f"Session {body.session_id} is finished.", 410)
        return Response({"type": "session_heartbeat"})

    @post("/telemetry", status_code=200, operation_class=operation())
    async def telemetry(self) -> dict[str, Any]:
        return {"status": "accepted"}  # the SDK's own usage events: Jarvis keeps none

    @post("/sessions/{session_id:str}/finish", status_code=200, operation_class=operation())
    async def finish(self, request: Request, session_id: str) -> dict[str, Any]:
        await service_of(request).finish(session_id, principal_of(request))
        return {}

    # --- training ------------------------------------------------------------------------------------

    @post("/create_model", status_code=200, operation_class=operation("CreateModelRequest"))
    async def create_model(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "CreateModelRequest")
        if body.optimizer_config.type not in ("adam", "adamw"):
            raise RequestFailed(f"optimizer_config {body.optimizer_config.type!r} is not supported; Jarvis trains "
                                "with AdamW.")
        lora = body.lora_config
        spec = LoraSpec() if lora is None else LoraSpec(  # the SDK always sends one; Tinker's defaults otherwise
            rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn, train_mlp=lora.train_mlp,
            train_unembed=lora.train_unembed)
        request_id = await service_of(request).create_model(principal_of(request), body.session_id,
                                                            body.model_seq_id, body.base_model, spec,
                                                            body.user_metadata)
        return future(request_id, model_id=f"{body.session_id}:train:{body.model_seq_id}")

    @post("/get_info", status_code=200, operation_class=operation("GetInfoRequest"))
    async def get_info(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "GetInfoRequest")
        return await service_of(request).info(body.model_id, principal_of(request))

    @post("/forward_backward", status_code=200, request_max_body_size=256 * 2**20, operation_class=operation())
    async def forward_backward(self, request: Request) -> dict[str, Any]:
        if request.headers.get("content-encoding"):
            raise RequestFailed("Send forward_backward uncompressed (this server answers proto_compress_fwdbwd="
                                "false).")
        return future(await service_of(request).forward_backward(principal_of(request), await request.body()))

    @post("/optim_step", status_code=200, operation_class=operation("OptimStepRequest"))
    async def optim_step(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "OptimStepRequest")
        return future(await service_of(request).optim_step(principal_of(request), body.model_id, body.optim_params,
                                                           body.seq_id))

    @post("/save_weights", status_code=200, operation_class=operation("SaveWeightsRequest"))
    async def save_weights(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "SaveWeightsRequest")
        return future(await service_of(request).save_weights(principal_of(request), body.model_id, body.path,
                                                             body.overwrite, body.user_metadata, body.seq_id))

    @post("/save_weights_for_sampler", status_code=200,
          operation_class=operation("SaveWeightsForSamplerRequest"))
    async def save_weights_for_sampler(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "SaveWeightsForSamplerRequest")
        return future(await service_of(request).save_for_sampler(principal_of(request), body.model_id, body.path,
                                                                 body.sampling_session_seq_id, body.seq_id))

    @post("/load_weights", status_code=200, operation_class=operation("LoadWeightsRequest"))
    async def load_weights(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "LoadWeightsRequest")
        return future(await service_of(request).load_weights(principal_of(request), body))

    # --- sampling ------------------------------------------------------------------------------------

    @post("/create_sampling_session", status_code=200,
          operation_class=operation("CreateSamplingSessionRequest"))
    async def create_sampling_session(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "CreateSamplingSessionRequest")
        sampler_id = await service_of(request).create_sampler(principal_of(request), body.session_id,
                                                              body.sampling_session_seq_id, body.base_model,
                                                              body.model_path)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    @get("/samplers/{sampler_id:str}", operation_class=operation())
    async def get_sampler(self, request: Request, sampler_id: str) -> dict[str, Any]:
        found = await service_of(request).sampler(sampler_id, principal_of(request))
        return {"sampler_id": found["id"], "base_model": found["base_model"], "model_path": found["model_path"]}

    @post("/asample", status_code=200, operation_class=operation("SampleRequest"))
    async def asample(self, request: Request) -> dict[str, Any]:
        body = await parse(request, "SampleRequest")
        request_id = await service_of(request).asample(principal_of(request), body, client_of(request))
        return future(request_id, sample_sequence_ids=[f"{request_id}:{i}" for i in range(body.num_samples)])

    # --- futures -------------------------------------------------------------------------------------

    @post("/retrieve_future", status_code=200, operation_class=operation("FutureRetrieveRequest"))
    async def retrieve_future(self, request: Request) -> Response:
        body = await parse(request, "FutureRetrieveRequest")
        service = service_of(request)
        viewer: Principal = principal_of(request)
        row = await service.futures.wait(body.request_id, viewer, service.settings.poll_wait_s)
        if row is None:
            return detail(f"Request {body.request_id} not found.", 404)
        if row["state"] == "pending":
            return Response({"type": "try_again", "request_id": body.request_id, "queue_state": "active"})
        if row["state"] == "failed":
            return Response({"error": row["error"], "category": row["category"]})
        return Response(row["body"], media_type=row["content_type"])

    # --- runs and checkpoints ------------------------------------------------------------------------

    @get("/training_runs/{run_id:str}", operation_class=operation())
    async def training_run(self, request: Request, run_id: str) -> dict[str, Any]:
        service = service_of(request)
        viewer = principal_of(request)
        return training_run(await service.model(run_id, viewer),
                            await service.store.run(service.store.checkpoints, run_id, viewer))

    @get("/training_runs", operation_class=operation())
    async def training_runs(self, request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        if not 1 <= limit <= 1000 or not 0 <= offset <= 2**31:
            raise RequestFailed(f"limit must be 1-1000 and offset 0 or more, got limit={limit}, offset={offset}.")
        service = service_of(request)
        viewer = principal_of(request)
        rows, total = await service.store.run(service.store.models, viewer, limit, offset)
        runs = [training_run(row, await service.store.run(service.store.checkpoints, row["id"], viewer))
                for row in rows]
        return {"training_runs": runs, "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @get("/training_runs/{run_id:str}/checkpoints", operation_class=operation())
    async def run_checkpoints(self, request: Request, run_id: str) -> dict[str, Any]:
        service = service_of(request)
        viewer = principal_of(request)
        await service.model(run_id, viewer)
        return {"checkpoints": [checkpoint(c) for c in
                                await service.store.run(service.store.checkpoints, run_id, viewer)]}

    @delete("/training_runs/{run_id:str}/checkpoints/{checkpoint_id:path}", status_code=200,
            operation_class=operation())
    async def delete_checkpoint(self, request: Request, run_id: str, checkpoint_id: str) -> dict[str, Any]:
        service = service_of(request)
        path = f"tinker://{run_id}/{checkpoint_id.strip('/')}"
        await service.checkpoint(path, principal_of(request))
        await service.retire(path, keep_files=True)  # a training checkpoint is in no engine: only its entry goes
        return {}

    @post("/weights_info", status_code=200, operation_class=operation(WeightsInfoRequest))
    async def weights_info(self, request: Request) -> dict[str, Any]:
        body = await parse(request, WeightsInfoRequest)
        service = service_of(request)
        found = await service.checkpoint(body.tinker_path, principal_of(request))
        model = await service.model(found["model_id"], principal_of(request))
        lora = model["lora"]
        return {"base_model": model["base_model"], "is_lora": True, "lora_rank": lora["rank"],
                "train_unembed": lora["train_unembed"], "train_mlp": lora["train_mlp"],
                "train_attn": lora["train_attn"]}


def iso(timestamp: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def checkpoint(row: dict[str, Any]) -> dict[str, Any]:
    segment = "weights" if row["kind"] == "training" else "sampler_weights"
    return {"checkpoint_id": f"{segment}/{row['name']}", "checkpoint_type": row["kind"], "time": iso(row["created_at"]),
            "tinker_path": row["path"], "size_bytes": row["size_bytes"], "public": False}


def training_run(model: dict[str, Any], checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    training = [c for c in checkpoints if c["kind"] == "training"]
    sampler = [c for c in checkpoints if c["kind"] == "sampler"]
    return {"training_run_id": model["id"], "base_model": model["base_model"], "model_owner": "you",
            "is_lora": True, "lora_rank": model["lora"]["rank"], "corrupted": False,
            "last_request_time": iso(model["last_request_at"]),
            "last_checkpoint": checkpoint(training[-1]) if training else None,
            "last_sampler_checkpoint": checkpoint(sampler[-1]) if sampler else None}
