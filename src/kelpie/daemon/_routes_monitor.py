"""Watching sandboxes: ``/v1/events`` (every sandbox's event log, followed live),
``/v1/stats`` and ``/v1/sandboxes/{ref}/stats`` (what they use), and
``/v1/sandboxes/{ref}/processes`` (the guest's processes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from kelpie.api import NDJSON, Event, ProcessList, SandboxStats, model_json
from kelpie.daemon._routes_system import runtime_of
from kelpie.service import event_record

router = APIRouter(tags=["monitor"])


@router.get("/stats")
async def stats_all(request: Request) -> list[SandboxStats]:
    """A sample of every running or paused sandbox (counters since each VM started; take
    two samples for rates)."""
    return await runtime_of(request).stats_all()


@router.get("/sandboxes/{ref}/stats")
async def sandbox_stats(request: Request, ref: str) -> SandboxStats:
    """A sample of what one sandbox uses: the host's view of its VM and the guest's own
    counters."""
    return await runtime_of(request).stats(ref)


@router.get("/sandboxes/{ref}/processes")
async def sandbox_processes(request: Request, ref: str) -> ProcessList:
    """The processes in the sandbox's guest (Docker's ``top``); the sandbox must run."""
    return await runtime_of(request).processes(ref)


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {"schema": Event.model_json_schema()}},
                     "description": "One event per line (an Event), as they are recorded."}},
)
async def events(
    request: Request,
    since: Annotated[float | None, Query(
        description="Unix time: start with the events recorded since then; none: only "
                    "events from now on.")] = None,
    until: Annotated[float | None, Query(
        description="Unix time: end the stream there; none: stream until disconnected.")
    ] = None,
    sandbox: Annotated[list[str], Query(
        description="Only these sandboxes (id, id prefix or name at the time).")] = [],  # noqa: B006
    kind: Annotated[list[str], Query(
        description="Only these kinds: state, main-exited, restarted, renamed, removed.")
    ] = [],  # noqa: B006
    state: Annotated[list[str], Query(
        description="Only events after which the sandbox is in one of these states.")
    ] = [],  # noqa: B006
) -> StreamingResponse:
    """Every sandbox's events (Docker's ``events``) as NDJSON; a bad filter is a 400
    before the stream starts."""
    stream = runtime_of(request).watch_events(since=since, until=until, sandboxes=sandbox,
                                              kinds=kind, states=state)

    async def lines() -> AsyncIterator[bytes]:
        async for event in stream:
            yield json.dumps(model_json(event_record(event))).encode() + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)
