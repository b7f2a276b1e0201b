"""``/v1/sandboxes``: create, list, inspect, lifecycle, remove, logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from kelpie.api import (
    NDJSON,
    CommitBody,
    CreateDone,
    ErrorResponse,
    Event,
    ForkBody,
    Image,
    MainExit,
    NetworkChange,
    Progress,
    RenameBody,
    Sandbox,
    SandboxCreate,
    StreamError,
    TimeoutChange,
    error_body,
    model_json,
)
from kelpie.daemon._routes_system import runtime_of
from kelpie.runtime import Runtime, SandboxInfo
from kelpie.service import event_record, sandbox_record

router = APIRouter(tags=["sandboxes"])

Ref = Annotated[str, PathParam(
    description="A sandbox name, id, or unique id prefix (at least 3 characters).")]


@router.get("/sandboxes")
async def list_sandboxes(request: Request, all: bool = False) -> list[Sandbox]:
    """Running and paused sandboxes; with ``all`` also stopped and crashed ones."""
    return [sandbox_record(i) for i in await runtime_of(request).list_sandboxes(all=all)]


@router.post(
    "/sandboxes", status_code=201, response_model=Sandbox,
    responses={201: {"content": {NDJSON: {}}, "description":
                     "The sandbox; or, when the request accepts application/x-ndjson, "
                     "progress lines then a result or error line (a create that fails "
                     "before its first step gets a plain error response)."}},
)
async def create_sandbox(request: Request, body: SandboxCreate) -> Response:
    """Create a sandbox from an image and start it (with its main command, if any)."""
    runtime = runtime_of(request)
    if body.backend:
        runtime.factory.registry.get(body.backend)  # an unknown name: 400 before any stream
    if NDJSON in request.headers.get("accept", ""):
        return await _create_streaming(request, runtime, body)
    info = await _create(runtime, body, None)
    return _json(sandbox_record(info), 201)


async def _create(
    runtime: Runtime, body: SandboxCreate, progress: asyncio.Queue[str] | None,
) -> SandboxInfo:
    return await runtime.create(body, progress=None if progress is None else progress.put_nowait)


async def _create_streaming(
    request: Request, runtime: Runtime, body: SandboxCreate,
) -> StreamingResponse:
    """Progress lines while the sandbox is created, then the result (or the error).

    The creation runs as its own task: a client that goes away does not cancel it half
    way, and the sandbox it makes is listed like any other. The 201 is sent with the first
    progress line; a create refused before that (a name in use, an invalid config, an
    unknown image) is raised here and answered with its own status, like a plain create.
    """
    queue: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(_create(runtime, body, queue))
    background: set[asyncio.Task[SandboxInfo]] = request.app.state.background
    background.add(task)
    task.add_done_callback(background.discard)
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    first = getter.result() if getter.done() else None
    if first is None:
        getter.cancel()
        error = task.exception()
        if error is not None:
            raise error
    return StreamingResponse(_create_streamed(task, queue, first), media_type=NDJSON,
                             status_code=201)


async def _create_streamed(
    task: asyncio.Task[SandboxInfo], queue: asyncio.Queue[str], first: str | None,
) -> AsyncIterator[bytes]:
    if first is not None:
        yield _line(Progress(message=first))
    while not task.done():
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield _line(Progress(message=getter.result()))
        else:
            getter.cancel()
    while not queue.empty():
        yield _line(Progress(message=queue.get_nowait()))
    exc = task.exception()
    if exc is not None:
        yield _line(StreamError(error=error_body(exc)))
    else:
        yield _line(CreateDone(sandbox=sandbox_record(task.result())))


@router.get("/sandboxes/{ref}")
async def inspect_sandbox(request: Request, ref: Ref) -> Sandbox:
    """One sandbox by name, id or unique id prefix."""
    return sandbox_record(await runtime_of(request).inspect(ref))


@router.get("/sandboxes/{ref}/events")
async def sandbox_events(request: Request, ref: Ref) -> list[Event]:
    """The sandbox's recorded state changes, oldest first."""
    return [event_record(e) for e in await runtime_of(request).events(ref)]


@router.post("/sandboxes/{ref}/start")
async def start_sandbox(request: Request, ref: Ref) -> Sandbox:
    """Start a stopped or crashed sandbox (its main command too)."""
    return sandbox_record(await runtime_of(request).start(ref))


@router.post("/sandboxes/{ref}/stop")
async def stop_sandbox(
    request: Request, ref: Ref,
    timeout: Annotated[float | None, Query(ge=0, le=3600)] = None,
) -> Sandbox:
    """Shut a sandbox down: gracefully, or at once with ``timeout=0``."""
    return sandbox_record(await runtime_of(request).stop(ref, timeout=timeout))


@router.post("/sandboxes/{ref}/kill")
async def kill_sandbox(
    request: Request, ref: Ref,
    signal: Annotated[str | None, Query(max_length=16, description=(
        "Send this signal (a number, or a name such as TERM or SIGINT) to the main "
        "command instead; the sandbox runs on (Docker's kill --signal)."))] = None,
) -> Sandbox:
    """Stop a sandbox at once (its VM is killed), or signal its main command."""
    return sandbox_record(await runtime_of(request).kill(ref, signal=signal))


@router.put("/sandboxes/{ref}/network")
async def set_sandbox_network(request: Request, ref: Ref, body: NetworkChange) -> Sandbox:
    """Replace the sandbox's egress rules (and switch between nat and policy); a running
    sandbox obeys them from its next packet."""
    return sandbox_record(await runtime_of(request).set_network(
        ref, allow=body.allow, deny=body.deny, network=body.network))


@router.post("/sandboxes/{ref}/timeout")
async def set_sandbox_timeout(request: Request, ref: Ref, body: TimeoutChange) -> Sandbox:
    """Give the sandbox a timeout counted from now, replacing any it had (null: none);
    when it passes, on_timeout happens to it (remove, pause or stop)."""
    return sandbox_record(await runtime_of(request).set_timeout(
        ref, body.timeout, on_timeout=body.on_timeout))


@router.post("/sandboxes/{ref}/pause")
async def pause_sandbox(request: Request, ref: Ref) -> Sandbox:
    """Freeze a running sandbox."""
    return sandbox_record(await runtime_of(request).pause(ref))


@router.post("/sandboxes/{ref}/rename")
async def rename_sandbox(request: Request, ref: Ref, body: RenameBody) -> Sandbox:
    """Give a sandbox another name (409 SandboxNameInUse when it is taken)."""
    return sandbox_record(await runtime_of(request).rename(ref, body.name))


@router.post("/sandboxes/{ref}/commit", status_code=201)
async def commit_sandbox(request: Request, ref: Ref, body: CommitBody) -> Image:
    """Store a running sandbox's file system changes over its image as a new image
    (Docker's commit): the new layer made from what the guest reports, checked as
    untrusted; its config carries the sandbox's env, workdir, user and command."""
    stored = await runtime_of(request).commit(ref, body.reference, message=body.message)
    return Image(id=stored.id, digest=stored.digest, tags=list(stored.tags), size=stored.size)


@router.post("/sandboxes/{ref}/wait")
async def wait_sandbox(request: Request, ref: Ref) -> MainExit:
    """Wait until the sandbox's main command ends; its exit code."""
    return MainExit(exit_code=await runtime_of(request).wait_main(ref))


@router.post("/sandboxes/{ref}/fork", status_code=201)
async def fork_sandbox(request: Request, ref: Ref, body: ForkBody) -> list[Sandbox]:
    """Fork a running (or paused) sandbox into ``count`` children, each a copy of it now
    (the parent pauses only while it is captured; children share its memory copy-on-write
    where the backend can)."""
    children = await runtime_of(request).fork(ref, body.count, name_prefix=body.name_prefix,
                                              names=body.names, disk_mib=body.disk_mib)
    return [sandbox_record(child) for child in children]


@router.post("/sandboxes/{ref}/resume")
async def resume_sandbox(request: Request, ref: Ref) -> Sandbox:
    """Let a paused sandbox run again."""
    return sandbox_record(await runtime_of(request).resume(ref))


@router.delete("/sandboxes/{ref}", status_code=204)
async def remove_sandbox(request: Request, ref: Ref, force: bool = False) -> Response:
    """Remove a sandbox at rest (or, with ``force``, a running one)."""
    await runtime_of(request).remove(ref, force=force)
    return Response(status_code=204)


@router.get(
    "/sandboxes/{ref}/logs",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}},
               404: {"model": ErrorResponse}},
)
async def sandbox_logs(
    request: Request, ref: Ref,
    tail: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
    follow: bool = False, console: bool = False,
) -> StreamingResponse:
    """The sandbox's logs (main command output, else console); ``follow`` streams on."""
    runtime = runtime_of(request)
    info = await runtime.inspect(ref)  # an unknown sandbox is a 404, before the stream starts
    if not follow:
        logs = await runtime.read_logs(info.id, tail=tail, console=console)
        return StreamingResponse(iter([logs]),
                                 media_type="application/octet-stream")
    return StreamingResponse(runtime.follow_logs(info.id, tail=tail, console=console),
                             media_type="application/octet-stream")


def _line(model: Progress | CreateDone | StreamError) -> bytes:
    return json.dumps(model_json(model)).encode() + b"\n"


def _json(model: Sandbox, status: int) -> Response:
    return Response(json.dumps(model_json(model)), status_code=status,
                    media_type="application/json")
