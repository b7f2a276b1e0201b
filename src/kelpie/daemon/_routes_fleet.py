"""``/v1/fleet``: what the fleet this daemon's host belongs to looks like.

A fleet's controller runs elsewhere (a Ray actor); each round it tells every host's
daemon what it saw, so the dashboard of any host shows the whole fleet with no Ray in
the daemon. The view lives in memory: a restarted daemon shows it again after the next
round.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from kelpie._changes import Changes
from kelpie._exceptions import KelpieError
from kelpie.api import NDJSON, FleetView, model_json
from kelpie.daemon._streaming import followed

router = APIRouter(tags=["fleet"])


class NotInFleet(KelpieError):
    """This daemon has heard from no fleet controller (HTTP 404)."""


class FleetViews:
    """The fleet's view as its controller last sent it, and its changes."""

    def __init__(self) -> None:
        self.view: FleetView | None = None
        self.changes = Changes()

    def show(self, view: FleetView) -> None:
        self.view = view
        self.changes.bump()

    def now(self) -> dict[str, Any]:
        if self.view is None:
            raise NotInFleet("this daemon's host is in no fleet: no fleet controller has "
                             "sent it a view (`kelpie fleet up` makes a fleet of Ray nodes)")
        return model_json(self.view)


def views_of(request: Request) -> FleetViews:
    views: FleetViews = request.app.state.fleet
    return views


@router.put("/fleet", status_code=204)
async def show_fleet(request: Request, view: FleetView) -> Response:
    """Replace the fleet's view (a fleet controller sends it every round)."""
    views_of(request).show(view)
    return Response(status_code=204)


@router.get(
    "/fleet", response_model=FleetView,
    responses={200: {"content": {NDJSON: {}}, "description":
                     "The view; with follow, one per line: the view now, then again each "
                     "time the controller sends one."}},
)
async def fleet_view(
    request: Request,
    follow: Annotated[bool, Query(description="Stream the view again at every change.")
                      ] = False,
) -> Response:
    """The fleet's hosts with their status, capacity and sandboxes, as its controller last
    sent them; 404 when none has (the host is in no fleet)."""
    views = views_of(request)
    first = views.now()  # not in a fleet: a 404 before any stream
    if not follow:
        return JSONResponse(first)
    return StreamingResponse(followed(views.changes, views.now), media_type=NDJSON)
