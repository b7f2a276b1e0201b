"""``/v1/images``: the daemon's image store (list, inspect, remove; pull from a registry,
push to one)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

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
    StreamError,
    error_body,
    model_json,
)
from kelpie.daemon._routes_system import runtime_of
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
    return StreamingResponse(_streamed(request, pull), media_type=NDJSON)


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
    return StreamingResponse(_streamed(request, push), media_type=NDJSON)


async def _streamed(request: Request,
                    work: Callable[[BlobProgress], Coroutine[Any, Any, PullDone | PushDone]],
                    ) -> AsyncIterator[bytes]:
    """Progress lines while a pull or push runs (its own task: a client that goes away
    does not cancel it half way), then the result or the error."""
    queue: asyncio.Queue[PullProgress] = asyncio.Queue()

    def progress(digest: str, done: int, total: int) -> None:
        queue.put_nowait(PullProgress(digest=digest, done=done, total=total))

    task: asyncio.Task[PullDone | PushDone] = asyncio.create_task(work(progress))
    background: set[asyncio.Task[object]] = request.app.state.background
    background.add(task)
    task.add_done_callback(background.discard)
    while not task.done():
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield _line(getter.result())
        else:
            getter.cancel()
    while not queue.empty():
        yield _line(queue.get_nowait())
    exc = task.exception()
    yield _line(StreamError(error=error_body(exc)) if exc is not None else task.result())


def _line(model: PullProgress | PullDone | PushDone | StreamError) -> bytes:
    return json.dumps(model_json(model)).encode() + b"\n"
