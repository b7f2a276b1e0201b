"""``/v1/host``, ``/v1/sandboxes/{ref}/teleport`` and ``/v1/teleports``: moving sandboxes.

A client asks *this* daemon (the source) to teleport one of its sandboxes with
``POST /v1/sandboxes/{ref}/teleport``; this daemon then drives the *target* daemon through
``/v1/teleports`` (prepare, blobs, switch, commit, abort), authenticating with the
target's token. See :mod:`kelpie.teleport` for the steps and their guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse

from kelpie.api import (
    CHUNK_SHA256_HEADER,
    NDJSON,
    HostFacts,
    TeleportAccepted,
    TeleportBody,
    TeleportDone,
    TeleportInFlight,
    TeleportLive,
    TeleportOffer,
    TeleportReport,
    TeleportState,
    TeleportSwitch,
    model_json,
)
from kelpie.daemon._routes_system import runtime_of
from kelpie.daemon._streaming import Emit, followed, in_background, streamed
from kelpie.teleport import TeleportHost, pipe, unix_channel
from kelpie.vm import ConfigError, KelpieError

router = APIRouter(tags=["teleport"])

MAX_CHUNK = 64 << 20
TeleportId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{8,64}$",
                                      description="The teleport's id (hex).")]
BlobName = Annotated[str, PathParam(pattern=r"^[a-z]+-[A-Za-z0-9][A-Za-z0-9_.:-]{0,200}$",
                                    description="KIND-NAME, e.g. snapshot-memory.bin")]


def teleports_of(request: Request) -> TeleportHost:
    teleports: TeleportHost = request.app.state.teleports
    return teleports


@router.get("/host")
async def host_facts(request: Request) -> HostFacts:
    """What this host offers: arch, backends, free resources, images and guest kits."""
    return await runtime_of(request).host_facts()


# ---- the source: a client asks this daemon to move a sandbox ----------------------------
@router.post(
    "/sandboxes/{ref}/teleport", response_model=TeleportReport,
    responses={200: {"content": {NDJSON: {}}, "description":
                     "The report; or, when the request accepts application/x-ndjson, "
                     "progress lines then a result or error line."}},
)
async def teleport(request: Request, ref: str, body: TeleportBody) -> Response:
    """Move a sandbox to the daemon at ``to`` (live, full, checkpoint, or the best: auto).

    The move runs as its own task: a client that goes away does not cancel it half way."""
    runtime = runtime_of(request)
    info = await runtime.inspect(ref)  # an unknown sandbox: 404 before any stream
    teleporter = teleports_of(request).teleporter

    async def move(emit: Emit) -> TeleportDone:
        return TeleportDone(report=await teleporter.teleport(
            info.id, to=body.to, token=body.token, mode=body.mode,
            without_volumes=body.without_volumes, progress=emit,
            converge_timeout=body.converge_timeout, arch=body.arch))

    if NDJSON not in request.headers.get("accept", ""):
        done = await asyncio.shield(in_background(request, move(lambda _: None)))
        return JSONResponse(model_json(done.report))
    return StreamingResponse(streamed(request, move), media_type=NDJSON)


@router.get(
    "/teleports", response_model=list[TeleportInFlight],
    responses={200: {"content": {NDJSON: {}}, "description":
                     "The teleports; with follow, one JSON array per line: the list now, "
                     "then again at every step of any of them."}},
)
async def teleports_in_flight(
    request: Request,
    follow: Annotated[bool, Query(description="Stream the list again at every change.")
                      ] = False,
) -> Response:
    """The teleports this daemon is sending now: phase, bytes, rate and the downtime so far."""
    flights = teleports_of(request).flights

    def now() -> list[dict[str, Any]]:
        return [model_json(f) for f in flights.now()]

    if not follow:
        return JSONResponse(now())
    return StreamingResponse(followed(flights.changes, now), media_type=NDJSON)


# ---- the target: another daemon moves a sandbox here ------------------------------------
@router.post("/teleports", status_code=201)
async def prepare(request: Request, offer: TeleportOffer) -> TeleportAccepted:
    """Reserve for a sandbox another daemon offers; say what this host lacks of it."""
    return await teleports_of(request).receiver.prepare(offer)


@router.get("/teleports/{teleport_id}")
async def teleport_state(request: Request, teleport_id: TeleportId) -> TeleportState:
    """Where a teleport to this host stands (``unknown`` if it never was prepared)."""
    return await teleports_of(request).receiver.state(teleport_id)


@router.get("/teleports/{teleport_id}/blobs/{name}")
async def received(request: Request, teleport_id: TeleportId,
                   name: BlobName) -> dict[str, int]:
    """How many bytes of the blob have arrived (resume from there)."""
    return {"received": await teleports_of(request).receiver.received(teleport_id, name)}


@router.put(
    "/teleports/{teleport_id}/blobs/{name}",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def put_chunk(
    request: Request, teleport_id: TeleportId, name: BlobName,
    offset: Annotated[int, Query(ge=0)], size: Annotated[int, Query(ge=0)],
    sha256: Annotated[str, Query(pattern=r"^[0-9a-f]{64}$")],
    chunk_sha256: Annotated[str, Header(alias=CHUNK_SHA256_HEADER,
                                        pattern=r"^[0-9a-f]{64}$")],
) -> dict[str, int]:
    """Append one chunk (the body) at ``offset`` of a blob of ``size`` bytes whose sha256
    is ``sha256``; the chunk's own sha256 comes in a header and is checked on arrival."""
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > MAX_CHUNK:
            raise ConfigError([f"a chunk may have at most {MAX_CHUNK} bytes"],
                              what="teleport chunk")
    received_now = await teleports_of(request).receiver.put_chunk(
        teleport_id, name, offset, bytes(data), size=size, sha256=sha256,
        chunk_sha256=chunk_sha256)
    return {"received": received_now}


@router.post("/teleports/{teleport_id}/switch")
async def switch(request: Request, teleport_id: TeleportId,
                 body: TeleportSwitch) -> TeleportState:
    """Everything has arrived: restore the sandbox here and prove its agent answers."""
    return await teleports_of(request).receiver.switch(teleport_id, body)


@router.post("/teleports/{teleport_id}/commit")
async def commit(request: Request, teleport_id: TeleportId) -> TeleportState:
    """The commit point: this host owns the restored sandbox from now on."""
    return await teleports_of(request).receiver.commit(teleport_id)


@router.post("/teleports/{teleport_id}/abort")
async def abort(request: Request, teleport_id: TeleportId) -> TeleportState:
    """Discard what arrived and the restored copy (a no-op once owned)."""
    return await teleports_of(request).receiver.abort(teleport_id)


@router.post("/teleports/{teleport_id}/live")
async def live_start(request: Request, teleport_id: TeleportId,
                     body: TeleportLive) -> TeleportState:
    """Start a VM that waits for the source's live migration (over ``.../live/{channel}``)."""
    return await teleports_of(request).receiver.live_start(teleport_id, body)


@router.websocket("/teleports/{teleport_id}/live/{channel}")
async def live_channel(websocket: WebSocket, teleport_id: str, channel: str) -> None:
    """Carry one byte stream of a live migration (binary messages both ways) to the
    waiting VM's ``channel`` (``nbd`` or ``migration``)."""
    teleports: TeleportHost = websocket.app.state.teleports
    try:
        path = teleports.receiver.live_socket(teleport_id, channel)
    except KelpieError as exc:
        await websocket.close(code=1008, reason=str(exc)[:120])
        return
    await websocket.accept()
    try:
        async with unix_channel(path) as local:
            await pipe(_ServerChannel(websocket), local)
    except OSError:
        pass  # the VM went away: the source's side sees the channel end
    finally:
        with contextlib.suppress(Exception):
            await websocket.close()


class _ServerChannel:
    """The daemon's end of a channel WebSocket as a :class:`kelpie.teleport.Channel`."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    async def send(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def receive(self) -> bytes:
        try:
            message = await self._ws.receive()
        except WebSocketDisconnect:
            return b""
        if message.get("type") == "websocket.disconnect":
            return b""
        data = message.get("bytes")
        return data if isinstance(data, bytes) else b""
