"""Files in a sandbox: ``/v1/sandboxes/{ref}/files`` (read, write, remove) and ``/dir``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from kelpie.api import ErrorResponse, FileEntry
from kelpie.daemon._routes_sandboxes import Ref
from kelpie.daemon._routes_system import runtime_of

router = APIRouter(tags=["files"])

GuestPath = Annotated[str, Query(
    min_length=1, max_length=4096, description="An absolute path in the guest.",
    # documented, not enforced here: the runtime checks it and says what is wrong (400)
    json_schema_extra={"pattern": "^/[^\\u0000]*$"})]


@router.get(
    "/sandboxes/{ref}/files",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}},
               404: {"model": ErrorResponse}},
)
async def read_file(request: Request, ref: Ref, path: GuestPath) -> StreamingResponse:
    """A file's bytes, streamed."""
    chunks = runtime_of(request).read_file_stream(ref, path)
    first = await anext(chunks, b"")  # errors (no such file...) surface before the 200

    async def stream() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(stream(), media_type="application/octet-stream")


@router.put(
    "/sandboxes/{ref}/files", status_code=204,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def write_file(
    request: Request, ref: Ref, path: GuestPath,
    mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
) -> Response:
    """Write a file atomically from the request body (streamed)."""
    await runtime_of(request).write_file(ref, path, request.stream(), mode=mode)
    return Response(status_code=204)


@router.delete("/sandboxes/{ref}/files", status_code=204)
async def remove_file(request: Request, ref: Ref, path: GuestPath,
                      recursive: bool = False) -> Response:
    """Remove a file (or with ``recursive`` a directory tree)."""
    await runtime_of(request).remove_path(ref, path, recursive=recursive)
    return Response(status_code=204)


@router.get("/sandboxes/{ref}/dir")
async def list_dir(request: Request, ref: Ref, path: GuestPath) -> list[FileEntry]:
    """A directory's entries (symlinks not followed)."""
    return [FileEntry.from_info(i) for i in await runtime_of(request).list_dir(ref, path)]


@router.post("/sandboxes/{ref}/dir", status_code=204)
async def make_dir(request: Request, ref: str, path: GuestPath,
                   mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o755) -> Response:
    """Create a directory and its missing parents (an existing one is fine)."""
    await runtime_of(request).mkdir(ref, path, mode=mode)
    return Response(status_code=204)
