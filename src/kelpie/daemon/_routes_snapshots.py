"""``/v1/snapshots`` and ``/v1/templates``: take, list, restore, export, import, remove."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from kelpie.api import (
    ErrorResponse,
    RestoreBody,
    Sandbox,
    Snapshot,
    SnapshotCompatibility,
    SnapshotCreate,
    TemplateCreate,
)
from kelpie.daemon._routes_system import runtime_of
from kelpie.runtime import Runtime
from kelpie.service import sandbox_record, snapshot_record

router = APIRouter(tags=["snapshots"])

PIPE_CHUNK = 1 << 20


@router.get("/snapshots")
async def list_snapshots(request: Request, templates: bool | None = None) -> list[Snapshot]:
    """Snapshots, oldest first (``templates``: only templates, or only plain ones)."""
    snapshots = await runtime_of(request).list_snapshots(templates=templates)
    return [snapshot_record(s) for s in snapshots]


@router.post("/snapshots", status_code=201)
async def create_snapshot(request: Request, body: SnapshotCreate) -> Snapshot:
    """Snapshot a sandbox (full: running or paused; disk: stopped; checkpoint: running)."""
    info = await runtime_of(request).snapshot(body.sandbox, name=body.name, kind=body.kind,
                                              leave_paused=body.leave_paused,
                                              workspace=body.workspace)
    return snapshot_record(info)


@router.get("/snapshots/{ref}")
async def inspect_snapshot(request: Request, ref: str) -> Snapshot:
    """One snapshot by name, id or unique id prefix."""
    return snapshot_record(await runtime_of(request).inspect_snapshot(ref))


@router.get("/snapshots/{ref}/compatibility")
async def snapshot_compatibility(request: Request, ref: str) -> SnapshotCompatibility:
    """What restoring the snapshot needs of a host, and why it would not restore on this
    one (if it would not)."""
    snap, manifest, reasons = await runtime_of(request).snapshot_compatibility(ref)
    return SnapshotCompatibility(
        id=snap.id, name=snap.name, kind=manifest.kind.value, backend=manifest.backend,
        backend_version=manifest.backend_version, arch=manifest.arch,
        cpu_model=manifest.cpu_model, machine=manifest.machine, vcpus=manifest.vcpus,
        memory_mib=manifest.memory_mib, guestkit_digest=manifest.guestkit_digest,
        base_image_digest=manifest.base_image_digest, restorable_here=not reasons,
        reasons=reasons)


@router.delete("/snapshots/{ref}", status_code=204)
async def remove_snapshot(request: Request, ref: str) -> Response:
    """Delete a snapshot (or template)."""
    await runtime_of(request).delete_snapshot(ref)
    return Response(status_code=204)


@router.post("/snapshots/{ref}/restore", status_code=201)
async def restore_snapshot(request: Request, ref: str, body: RestoreBody) -> Sandbox:
    """Create a new sandbox from a snapshot, as it was when captured; or with ``into``,
    roll that stopped sandbox back to it."""
    runtime = runtime_of(request)
    if body.into is not None:
        if body.name or body.env or body.labels:
            from kelpie.vm import ConfigError

            raise ConfigError(["name, env and labels cannot be given with into: the "
                               "sandbox keeps its own"], what="restore")
        info = await runtime.restore_into(body.into, ref, paused=body.paused)
    else:
        info = await runtime.restore(ref, name=body.name, paused=body.paused, env=body.env,
                                     labels=body.labels)
    return sandbox_record(info)


@router.get(
    "/snapshots/{ref}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}, "application/zstd": {}}},
               404: {"model": ErrorResponse}},
)
async def export_snapshot(request: Request, ref: str, compress: bool = False,
                          ) -> StreamingResponse:
    """The snapshot as one archive (tar; zstd-compressed with ``compress``)."""
    runtime = runtime_of(request)
    await runtime.inspect_snapshot(ref)  # an unknown snapshot is a 404 before the stream starts
    read_fd, write_fd = os.pipe()
    writer = asyncio.ensure_future(_export_into(runtime, ref, write_fd, compress))

    async def stream() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(os.read, read_fd, PIPE_CHUNK):
                yield chunk
            await writer
        finally:
            os.close(read_fd)
            if not writer.done():
                writer.cancel()

    return StreamingResponse(stream(), media_type="application/zstd" if compress
                             else "application/x-tar")


async def _export_into(runtime: Runtime, ref: str, fd: int, compress: bool) -> None:
    with os.fdopen(fd, "wb") as out, contextlib.suppress(BrokenPipeError):
        await runtime.export_snapshot(ref, out, compress=compress)


@router.post(
    "/snapshot-imports", status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def import_snapshot(
    request: Request,
    name: Annotated[str | None, Query(max_length=253)] = None,
) -> Snapshot:
    """Add a snapshot from an archive (the body); every blob is verified first."""
    runtime = runtime_of(request)
    runtime.snapshots_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=runtime.snapshots_dir) as spool:
        async for chunk in request.stream():
            await asyncio.to_thread(spool.write, chunk)
        spool.seek(0)
        info = await runtime.import_snapshot(spool, name=name)
    return snapshot_record(info)


# ---- templates --------------------------------------------------------------------------
@router.get("/templates")
async def list_templates(request: Request) -> list[Snapshot]:
    """The templates sandboxes can be created from."""
    return [snapshot_record(s) for s in await runtime_of(request).list_snapshots(templates=True)]


@router.post("/templates", status_code=201)
async def create_template(request: Request, body: TemplateCreate) -> Snapshot:
    """Boot a sandbox from the image once, snapshot it as the template, remove it."""
    return snapshot_record(await runtime_of(request).create_template(body))


@router.delete("/templates/{ref}", status_code=204)
async def remove_template(request: Request, ref: str) -> Response:
    """Delete a template."""
    await runtime_of(request).delete_snapshot(ref, template=True)
    return Response(status_code=204)
