"""``/v1/builds``: build an image from a Dockerfile; the request's body is the build
context as a tar, unpacked with the same checks as an image layer (no ``..``, no links
out of it, limited size) before the build reads it."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from kelpie._exceptions import ConfigError
from kelpie.api import NDJSON, BuildOptions, Image, PullDone, model_json
from kelpie.daemon._routes_system import runtime_of
from kelpie.daemon._streaming import Emit, streamed
from kelpie.images import (
    ImageReference,
    LayerError,
    LayerLimits,
    Platform,
    apply_layer,
    remove_tree,
)

router = APIRouter(tags=["images"])

MAX_CONTEXT_BYTES = 8 << 30
"""A build context larger than this (as a tar) is refused."""
TAR = "application/x-tar"
CHUNK = 1 << 20


@router.post(
    "/builds",
    openapi_extra={"requestBody": {"required": True, "content": {
        TAR: {"schema": {"type": "string", "format": "binary"}}},
        "description": "The build context (a tar of the directory with the Dockerfile)."}},
    responses={200: {"content": {NDJSON: {}}, "description":
                     "The image; or, when the request accepts application/x-ndjson, a "
                     "BuildEvent line per step, note and chunk of RUN output, then a "
                     "result or error line."}},
)
async def build(request: Request, options: Annotated[BuildOptions, Query()]) -> Response:
    """Build an image from the Dockerfile in the uploaded context; every RUN runs in a
    micro-VM, unchanged steps come from the build cache."""
    for tag in options.tag:
        ImageReference.parse(tag)  # bad input: 400 before any upload is kept
    if options.platform:
        Platform.parse(options.platform)
    runtime = runtime_of(request)
    scratch = runtime.images.build_dir
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=scratch, prefix="context-"))
    try:
        await _receive(request, work)
    except BaseException:
        await asyncio.to_thread(remove_tree, work)
        raise

    async def run(emit: Emit | None) -> PullDone:
        try:
            stored = await runtime.build(work / "context", options, progress=emit)
        finally:
            await asyncio.to_thread(remove_tree, work)
        return PullDone(image=Image(id=stored.id, digest=stored.digest,
                                    tags=list(stored.tags), size=stored.size))

    if NDJSON not in request.headers.get("accept", ""):
        done = await run(None)
        return Response(json.dumps(model_json(done.image)), media_type="application/json")
    return StreamingResponse(streamed(request, run), media_type=NDJSON)


async def _receive(request: Request, work: Path) -> None:
    """The body into ``work/context.tar``, then unpacked into ``work/context``."""
    upload = work / "context.tar"
    received = 0
    with upload.open("wb") as out:
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_CONTEXT_BYTES:
                raise ConfigError([f"the build context is over {MAX_CONTEXT_BYTES} bytes: "
                                   "leave large files out with .dockerignore"], what="build")
            await asyncio.to_thread(out.write, chunk)
    if received == 0:
        raise ConfigError(["the request has no body: send the build context as a tar "
                           f"({TAR})"], what="build")
    (work / "context").mkdir()
    limits = LayerLimits(max_bytes=MAX_CONTEXT_BYTES)
    try:
        await asyncio.to_thread(apply_layer, work / "context", upload,
                                media_type="application/vnd.oci.image.layer.v1.tar",
                                limits=limits, preserve_owner=False)
    except LayerError as exc:
        raise ConfigError([f"the build context (the request's tar) is refused: {exc}"],
                          what="build") from None
    upload.unlink()
