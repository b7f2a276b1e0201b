"""``/v1/version`` and ``/v1/shutdown``: the daemon itself."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response

from kelpie._version import __version__
from kelpie.api import API_VERSION, VersionInfo
from kelpie.runtime import Runtime

router = APIRouter(tags=["daemon"])


def runtime_of(request: Request) -> Runtime:
    """The runtime the app serves."""
    runtime: Runtime = request.app.state.runtime
    return runtime


@router.get("/version")
async def version(request: Request) -> VersionInfo:
    """The daemon's version, API version, process id and data directory."""
    return VersionInfo(version=__version__, api_version=API_VERSION, pid=os.getpid(),
                       data_dir=str(runtime_of(request).data_dir))


@router.post("/shutdown", status_code=202, response_class=Response,
             responses={202: {"description": "Shutting down (no body)."}})
async def shutdown(request: Request, stop_sandboxes: bool = False) -> Response:
    """Stop the daemon; sandboxes keep running unless ``stop_sandboxes``."""
    runtime = runtime_of(request)
    if stop_sandboxes:
        for info in await runtime.list_sandboxes():
            await runtime.stop(info.id)
    on_shutdown = request.app.state.on_shutdown
    if on_shutdown is not None:
        on_shutdown(stop_sandboxes)
    return Response(status_code=202)
