"""``/v1/images``: the daemon's image store (list, inspect, remove; pull from a registry,
push to one)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from kelpie.api import (
    NDJSON,
    Image,
    ImageDetails,
    PullBody,
    PullDone,
    PullProgress,
    PushBody,
    PushDone,
    PushOutcome,
    model_json,
)
from kelpie.daemon._routes_system import runtime_of
from kelpie.daemon._streaming import streamed
from kelpie.images import BlobProgress, ImageReference, Platform, StoredImage

router = APIRouter(tags=["images"])


def _image(stored: StoredImage) -> Image:
    return Image(id=stored.id, digest=stored.digest, tags=list(stored.tags), size=stored.size)


@router.get("/images")
async def list_images(request: Request) -> list[Image]:
    """The images in the daemon's store."""
    return [_image(i) for i in await runtime_of(request).list_images()]


@router.get("/images/{ref:path}")
async def inspect_image(request: Request, ref: str) -> ImageDetails:
    """One image (a tag, digest or id prefix): manifest digest, config, layers, holders."""
    return ImageDetails.from_stored(await runtime_of(request).inspect_image(ref))


@router.delete("/images/{ref:path}")
async def remove_image(request: Request, ref: str, force: bool = False) -> list[str]:
    """Untag or delete an image; the digests of the images deleted."""
    return await runtime_of(request).remove_image(ref, force=force)


@router.post(
    "/image-pulls",
    responses={200: {"content": {NDJSON: {}}, "description":
                     "The image; or, when the request accepts application/x-ndjson, "
                     "progress lines per blob then a result or error line."}},
)
async def pull_image(request: Request, body: PullBody) -> Response:
    """Pull an image from a registry (HTTPS unless ``insecure`` or loopback)."""
    ImageReference.parse(body.reference)  # bad input: 400 before any stream
    if body.platform:
        Platform.parse(body.platform)
    runtime = runtime_of(request)

    async def pull(progress: BlobProgress | None) -> PullDone:
        stored = await runtime.pull_image(body.reference, platform=body.platform,
                                          insecure=body.insecure, progress=progress)
        return PullDone(image=_image(stored))

    if NDJSON not in request.headers.get("accept", ""):
        done = await pull(None)
        return Response(json.dumps(model_json(done.image)), media_type="application/json")
    return StreamingResponse(streamed(request, lambda emit: pull(_blob_lines(emit))),
                             media_type=NDJSON)


@router.post(
    "/image-pushes",
    responses={200: {"content": {NDJSON: {}}, "description":
                     "What the push did; or, when the request accepts application/x-ndjson, "
                     "progress lines per blob then a result or error line."}},
)
async def push_image(request: Request, body: PushBody) -> Response:
    """Push a stored image to a registry: blobs it has are not sent, blobs of another of its
    repositories are mounted, the rest go up in chunks (HTTPS unless ``insecure`` or
    loopback)."""
    if body.reference is not None:
        ImageReference.parse(body.reference)  # bad input: 400 before any stream
    runtime = runtime_of(request)
    runtime.images.resolve(body.image)  # an unknown image: 404 before any stream

    async def push(progress: BlobProgress | None) -> PushDone:
        report = await runtime.push_image(body.image, body.reference, insecure=body.insecure,
                                          progress=progress)
        return PushDone(push=PushOutcome(**dataclasses.asdict(report)))

    if NDJSON not in request.headers.get("accept", ""):
        done = await push(None)
        return Response(json.dumps(model_json(done.push)), media_type="application/json")
    return StreamingResponse(streamed(request, lambda emit: push(_blob_lines(emit))),
                             media_type=NDJSON)


def _blob_lines(emit: Callable[[PullProgress], None]) -> BlobProgress:
    return lambda digest, done, total: emit(PullProgress(digest=digest, done=done, total=total))



