"""The daemon's ASGI application: FastAPI routes over one :class:`~kelpie.runtime.Runtime`.

:func:`create_app` builds it; the runtime is opened and closed by the caller (the server),
so the same app serves tests in-process. Every Kelpie error becomes a JSON
:class:`~kelpie.api.ErrorResponse` with the status from :data:`kelpie.api.ERROR_STATUS`;
anything else is a bug, logged with its traceback and answered 500. Requests the routes
cannot take (invalid input: 422; unknown path: 404; unsupported method: 405) get the same
error body, so every error a client sees has one shape.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from kelpie._version import __version__
from kelpie.api import ErrorResponse, error_body, error_status, model_json
from kelpie.daemon import (
    _dashboard,
    _routes_builds,
    _routes_exec,
    _routes_files,
    _routes_fleet,
    _routes_images,
    _routes_monitor,
    _routes_sandboxes,
    _routes_snapshots,
    _routes_system,
    _routes_teleport,
)
from kelpie.daemon._dashboard import NO_SESSION, DashboardSessions, NotAllowed, is_public
from kelpie.runtime import Runtime
from kelpie.teleport import TeleportHost
from kelpie.vm import ConfigError, GuestFileError, KelpieError

log = logging.getLogger("kelpie.daemon")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUEST_ERRNO_STATUS = {"ENOENT": 404, "EACCES": 403, "EPERM": 403, "EEXIST": 409,
                      "ENOTEMPTY": 409}


def create_app(runtime: Runtime, *, on_shutdown: Callable[[bool], None] | None = None,
               teleports: TeleportHost | None = None,
               dashboard: DashboardSessions | None = None,
               dashboard_address: Callable[[], Awaitable[str]] | None = None) -> FastAPI:
    """The REST API over ``runtime`` (already open while the app serves requests), and the
    dashboard page.

    ``on_shutdown(stop_sandboxes)`` is called by ``POST /v1/shutdown``; ``teleports`` moves
    sandboxes to and from other daemons (default: one over ``runtime``, its journal opened
    on first use); ``dashboard`` holds the dashboard's logins and sessions, and
    ``dashboard_address()`` gives (listening first if need be) the base URL browsers reach
    it at (default: the URL the request came to).
    """
    app = FastAPI(
        title="Kelpie daemon",
        version=__version__,
        description="Hardware-isolated micro-VM sandboxes: create, exec, files, logs.",
        responses=ERROR_RESPONSES,
    )
    app.state.runtime = runtime
    app.state.on_shutdown = on_shutdown
    app.state.background = set()
    app.state.exec_streams = {}  # exec_id -> the streamed exec (_routes_exec)
    app.state.teleports = teleports or TeleportHost(runtime)
    app.state.dashboard = dashboard or DashboardSessions(time.time)
    app.state.dashboard_address = dashboard_address
    app.state.fleet = _routes_fleet.FleetViews()  # what a fleet controller last sent
    for module in (_routes_system, _routes_sandboxes, _routes_exec, _routes_files,
                   _routes_snapshots, _routes_images, _routes_builds, _routes_teleport,
                   _routes_monitor, _routes_fleet, _dashboard):
        app.include_router(module.router, prefix="/v1")
    app.include_router(_dashboard.page_router)
    app.add_exception_handler(KelpieError, _kelpie_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid input (ConfigError), or a failed guest file operation."),
    401: _error("No valid bearer token (TCP listener only; the unix socket needs none)."),
    404: _error("No such sandbox, image, or guest file."),
    409: _error("The sandbox's state does not allow this, or the name is taken."),
    422: _error("The request does not match this document (ConfigError, with problems)."),
    500: _error("An internal error."),
    501: _error("The sandbox's backend does not support this."),
    502: _error("A registry the daemon pulls from failed or cannot be reached."),
    503: _error("The backend cannot run on the daemon's host."),
}
"""The error responses every operation may give (all with an ErrorResponse body)."""


def error_response(exc: BaseException, *, status: int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response for an error (its status from its class unless given)."""
    body = error_body(exc)
    if status is None:
        status = error_status(body.types)
        if isinstance(exc, GuestFileError):
            status = GUEST_ERRNO_STATUS.get(getattr(exc, "code", ""), 400)
    return JSONResponse(model_json(ErrorResponse(error=body)), status_code=status,
                        headers=headers)


async def _kelpie_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [_problem(e) for e in exc.errors()]
    return error_response(ConfigError(problems, what="request"), status=422)


def _problem(error: dict[str, Any]) -> str:
    """One validation error as a line naming where it is: ``cpus: Input should be...``."""
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    where, *rest = [str(p) for p in error.get("loc", ())] or ["request"]
    name = ".".join(rest)
    label = {"body": name or "the body", "query": f"query parameter {name!r}",
             "path": f"path parameter {name!r}", "header": f"header {name!r}"}.get(
                 where, ".".join([where, *rest]))
    return f"{label}: {error.get('msg', 'invalid')}"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (no route, method not allowed, unparsable body)."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    error: KelpieError = (ConfigError([exc.detail], what="request")
                          if exc.status_code in (400, 422) else KelpieError(exc.detail))
    return error_response(error, status=exc.status_code, headers=headers)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette names only the first route's)."""
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] is Match.FULL
                   for route in request.app.router.routes)]


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(exc)


class TokenAuth:
    """Requires ``Authorization: Bearer <token>``, or a dashboard session (see
    :mod:`kelpie.daemon._dashboard`), on every connection not on the unix socket.

    Fails closed: only a connection the server positively reports as coming through
    ``unix_path`` skips the check; with no token configured, every other connection needs a
    dashboard session. The dashboard page, its assets and its login exchange are public
    (they hold no data).
    """

    def __init__(self, app: ASGIApp, *, token: str | None, unix_path: str | None,
                 sessions: DashboardSessions | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.unix_path = unix_path
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        refused = NO_SESSION if self.sessions is None else self.sessions.check(scope)
        if refused is None or (scope["type"] == "http" and is_public(scope["method"],
                                                                      scope["path"])):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        if refused != NO_SESSION:  # a session, but not this page's request
            await error_response(NotAllowed(f"refused {refused}"))(scope, receive, send)
            return
        response = error_response(KelpieError(
            "unauthorized: this daemon needs 'Authorization: Bearer <token>' "
            "(kelpie --token-file FILE, or KELPIE_TOKEN), or a dashboard session"
        ), status=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        server = scope.get("server")
        if self.unix_path is not None and server is not None and tuple(server) == (
            self.unix_path, None,
        ):
            return True
        if self.token is None:
            return False
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(),
                                                                           self.token)
        return False
