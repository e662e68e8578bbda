"""Receiving an uploaded file: multipart/form-data streamed to disk, size-capped, inside the store.

The body is parsed as it arrives (never held in memory); the file part goes
to a temporary file in the store's own folder and is counted, and an upload
larger than JARVIS_BATCH_MAX_UPLOAD_BYTES stops with 413 as soon as the
limit is passed. The client's filename is kept only as a label.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from litestar import Request

from jarvis.errors import APIError, InvalidRequest

FORM_OVERHEAD = 64 * 1024  # headers and small fields around the file part
SMALL_FIELD_LIMIT = 4096


class UploadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"


@dataclass
class Upload:
    path: Path  # the received bytes, in a temporary file inside the store
    filename: str
    size: int
    fields: dict[str, str]


def clean_filename(name: str | None) -> str:
    """A display label from a client's filename: last path component, printable, at most 255 chars."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()
    return base[:255] or "upload.jsonl"


def too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(f"The file is larger than the {limit}-byte limit (JARVIS_BATCH_MAX_UPLOAD_BYTES); "
                          "split the batch into smaller files.", param="file", code="file_too_large")


async def receive_upload(request: Request, folder: Path, limit: int) -> Upload:
    from multipart import MultipartError, MultipartSegment, PushMultipartParser  # litestar's own parser

    content_type, options = request.content_type
    boundary = options.get("boundary")
    if content_type != "multipart/form-data" or not boundary:
        raise InvalidRequest("Upload the file as multipart/form-data with fields `file` and `purpose`.",
                             code="invalid_content_type")
    if (request.content_length or 0) > limit + FORM_OVERHEAD:
        raise too_large(limit)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"upload-{uuid.uuid4().hex}.part"
    fields: dict[str, str] = {}
    upload: Upload | None = None
    segment: MultipartSegment | None = None
    small = bytearray()
    try:
        with tmp.open("wb") as out, PushMultipartParser(boundary.encode(), max_segment_count=16) as parser:
            async for chunk in request.stream():
                for part in parser.parse(chunk):
                    if isinstance(part, MultipartSegment):
                        segment, small = part, bytearray()
                        if part.name == "file" and part.filename is not None:
                            upload = Upload(tmp, clean_filename(part.filename), 0, fields)
                    elif part and segment is not None:
                        if segment.name == "file" and upload is not None:
                            upload.size += len(part)
                            if upload.size > limit:
                                raise too_large(limit)
                            out.write(part)
                        else:
                            small.extend(part)
                            if len(small) > SMALL_FIELD_LIMIT:
                                raise InvalidRequest(f"Form field {segment.name!r} is too long.",
                                                     param=segment.name)
                    elif part is None and segment is not None:
                        if segment.name != "file":
                            fields[segment.name] = small.decode(segment.charset or "utf-8", errors="replace")
                        segment = None
                if parser.closed:
                    break
    except MultipartError as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidRequest(f"The multipart/form-data body is malformed: {exc}.", code="invalid_form") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if upload is None:
        tmp.unlink(missing_ok=True)
        raise InvalidRequest("The form has no `file` part.", param="file", code="missing_file")
    return upload
