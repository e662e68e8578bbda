"""The Files and Batches API: /v1/files and /v1/batches, as the official `openai` client calls them.

Handlers only check requests and render store rows; jobs run in the
`BatchService` the plugin started with the server. Every file and batch
belongs to the key that made it (a batch's result files to the batch's
owner): another key gets the 404 of an unknown id, and lists hold only the
caller's objects (`jarvis.auth`; an admin key sees all). Store calls run on
the store's own thread, off the event loop.
"""

from __future__ import annotations

from typing import Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.response import File
from pydantic import BaseModel, ConfigDict

from jarvis.auth import principal_of, visible
from jarvis.errors import APIError, EngineUnavailable, InvalidRequest, NotFound
from jarvis.plugins.batch.lines import ENDPOINTS
from jarvis.plugins.batch.service import COMPLETION_WINDOWS, BatchService
from jarvis.plugins.batch.store import TERMINAL, new_file_id
from jarvis.plugins.batch.upload import receive_upload
from jarvis.routes.openai import parse_body
from jarvis.server import server_of

PURPOSES = ("batch",)


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def service_of(request: Request) -> BatchService:
    service = server_of(request).extensions.get("batch")
    if service is None:
        raise EngineUnavailable("The batch service is not running.", code="batch_unavailable")
    return service


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def check_limit(limit: int, most: int) -> None:
    if not 1 <= limit <= most:
        raise InvalidRequest(f"limit must be between 1 and {most}, got {limit}.", param="limit",
                             code="invalid_value")


class FilesController(Controller):
    path = "/v1/files"
    tags = ["Batch"]

    @post("/", status_code=200, request_max_body_size=None,
          summary="Upload a JSONL file (multipart: file, purpose=batch).")
    async def create_file(self, request: Request) -> dict[str, Any]:
        service = service_of(request)
        store = service.store
        upload = await receive_upload(request, store.files_dir, service.settings.max_upload_bytes)
        try:
            purpose = upload.fields.get("purpose")
            if not purpose:
                raise InvalidRequest("The form has no `purpose`; send purpose=batch.", param="purpose",
                                     code="missing_purpose")
            if purpose not in PURPOSES:
                raise InvalidRequest(f"purpose {purpose!r} is not supported here; use one of: "
                                     f"{', '.join(PURPOSES)}.", param="purpose", code="invalid_purpose")
            return await store.run(store.keep_upload, upload.path, new_file_id(), upload.filename, purpose,
                                   upload.size, principal_of(request).owner)
        finally:
            upload.path.unlink(missing_ok=True)

    @get("/", summary="List uploaded and result files.")
    async def list_files(self, request: Request, purpose: str | None = None, after: str | None = None,
                         limit: int = 10000, order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        check_limit(limit, 10000)
        store = service_of(request).store
        data, has_more = await store.run(store.list_files, purpose, after, limit, order == "asc",
                                         principal_of(request))
        return page(data, has_more)

    @get("/{file_id:str}", summary="Describe one file.")
    async def get_file(self, request: Request, file_id: str) -> dict[str, Any]:
        return await known_file(request, service_of(request), file_id)

    @get("/{file_id:str}/content", summary="Download a file's content.")
    async def file_content(self, request: Request, file_id: str) -> File:
        service = service_of(request)
        info = await known_file(request, service, file_id)
        return File(service.store.file_path(file_id), filename=info["filename"],
                    media_type="application/jsonl", content_disposition_type="attachment")

    @delete("/{file_id:str}", status_code=200, summary="Delete a file.")
    async def delete_file(self, request: Request, file_id: str) -> dict[str, Any]:
        service = service_of(request)
        store = service.store
        await known_file(request, service, file_id)
        readers = await store.run(store.batches_reading, file_id)
        if readers:
            raise APIError(f"File {file_id} is the input of active batch {readers[0]}; cancel it or let it "
                           "finish first.", param="file_id", code="file_in_use", status_code=409)
        await store.run(store.delete_file, file_id)
        return {"id": file_id, "object": "file", "deleted": True}


async def known_file(request: Request, service: BatchService, file_id: str,
                     param: str = "file_id") -> dict[str, Any]:
    """A file the caller may see, else the 404 of an unknown id."""
    found = await service.store.run(service.store.find_file, file_id)
    if found is None or not visible(principal_of(request), found[1], f"{request.method} {request.url.path}",
                                    file_id):
        raise NotFound(f"No such file: {file_id!r}.", param=param, code="file_not_found")
    return found[0]


class BatchesController(Controller):
    path = "/v1/batches"
    tags = ["Batch"]

    @post("/", status_code=200, summary="Create a batch job from an uploaded JSONL file.")
    async def create_batch(self, request: Request) -> dict[str, Any]:
        service = service_of(request)
        body = await parse_body(request, CreateBatchRequest)
        if body.endpoint not in ENDPOINTS:
            raise InvalidRequest(f"endpoint {body.endpoint!r} is not supported; use one of: "
                                 f"{', '.join(ENDPOINTS)}.", param="endpoint", code="invalid_value")
        if body.completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequest(f"completion_window {body.completion_window!r} is not supported; use one of: "
                                 f"{', '.join(COMPLETION_WINDOWS)}.", param="completion_window",
                                 code="invalid_value")
        info = await known_file(request, service, body.input_file_id, param="input_file_id")
        if info["purpose"] != "batch":
            raise InvalidRequest(f"File {body.input_file_id} has purpose {info['purpose']!r}; a batch needs a "
                                 "file uploaded with purpose=batch.", param="input_file_id", code="invalid_value")
        store = service.store
        batch_id = await store.run(
            store.create_batch, endpoint=body.endpoint, completion_window=body.completion_window,
            input_file_id=body.input_file_id, metadata=body.metadata,
            expires_in_s=COMPLETION_WINDOWS[body.completion_window], owner=principal_of(request).owner)
        service.launch(batch_id)
        return await known_batch(request, service, batch_id)

    @get("/", summary="List batches, newest first (cursor: after, limit).")
    async def list_batches(self, request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        check_limit(limit, 100)
        store = service_of(request).store
        data, has_more = await store.run(store.list_batches, after, limit, principal_of(request))
        return page(data, has_more)

    @get("/{batch_id:str}", summary="Describe one batch: status, request_counts, result files.")
    async def get_batch(self, request: Request, batch_id: str) -> dict[str, Any]:
        return await known_batch(request, service_of(request), batch_id)

    @post("/{batch_id:str}/cancel", status_code=200, summary="Cancel a batch; finished lines are kept.")
    async def cancel_batch(self, request: Request, batch_id: str) -> dict[str, Any]:
        service = service_of(request)
        batch = await known_batch(request, service, batch_id)
        if batch["status"] in TERMINAL:
            raise APIError(f"Batch {batch_id} is already {batch['status']}; only a validating or in-progress "
                           "batch can be cancelled.", param="batch_id", code="batch_not_cancellable",
                           status_code=409)
        if batch["status"] != "cancelling":
            await service.cancel(batch_id)
        return await known_batch(request, service, batch_id)


async def known_batch(request: Request, service: BatchService, batch_id: str) -> dict[str, Any]:
    """A batch the caller may see, else the 404 of an unknown id."""
    found = await service.store.run(service.store.find_batch, batch_id)
    if found is None or not visible(principal_of(request), found[1], f"{request.method} {request.url.path}",
                                    batch_id):
        raise NotFound(f"No such batch: {batch_id!r}.", param="batch_id", code="batch_not_found")
    return found[0]
