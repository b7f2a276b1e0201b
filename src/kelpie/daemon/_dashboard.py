"""The dashboard's way in: one-time login tokens exchanged for a session cookie, the checks
every cookie-authenticated request passes, and the routes that serve the page.

A browser cannot reach a unix socket, and its JavaScript cannot put a Bearer header on a
WebSocket, so the dashboard logs in once (as Jupyter does): ``kelpie dashboard`` asks the
daemon (over its socket, or with its token) for a URL holding a one-time token in its
fragment; the page exchanges that token for a session cookie (``HttpOnly``,
``SameSite=Strict``) and a CSRF token. From then on the page uses the public REST API with
the cookie: a state-changing request must carry the CSRF token in ``X-CSRF-Token``, and a
WebSocket upgrade (or any unsafe request) must come from the page's own origin.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from kelpie._exceptions import KelpieError
from kelpie.api import DashboardLogin, DashboardSession, LoginBody

COOKIE = "kelpie_session"
CSRF_HEADER = "x-csrf-token"
LOGIN_TOKEN_TTL = 300.0
"""Seconds a one-time login token stays good."""
SESSION_TTL = 12 * 3600.0
MAX_LOGIN_TOKENS = 64
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
NO_SESSION = "no session"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css",
          "LICENSES.md": "text/markdown; charset=utf-8"}
"""What ``dashboard/`` builds (TypeScript with Vite, committed: pip installs need no Node)."""

router = APIRouter(tags=["dashboard"])
page_router = APIRouter(include_in_schema=False)


class LoginRefused(KelpieError):
    """A dashboard login with a token that is unknown, used or expired (HTTP 401)."""


class NotAllowed(KelpieError):
    """A dashboard session asked for what only the daemon's own users may (HTTP 403)."""


@dataclass
class _Session:
    csrf: str
    expires: float
    host: str
    """The Host it logged in at: a request naming another (DNS rebinding) is not its."""


class DashboardSessions:
    """The one-time login tokens and the sessions they became (in memory: a restarted
    daemon asks for a new login)."""

    def __init__(self, clock: Callable[[], float], *, token: str | None = None) -> None:
        self._clock = clock
        self._token = token.encode() if token else None
        self._logins: dict[str, float] = {}
        self._sessions: dict[str, _Session] = {}

    def mint(self) -> str:
        """A new one-time login token (good for :data:`LOGIN_TOKEN_TTL` seconds)."""
        now = self._clock()
        self._logins = {t: exp for t, exp in self._logins.items() if exp > now}
        while len(self._logins) >= MAX_LOGIN_TOKENS:  # the oldest go first
            del self._logins[min(self._logins, key=self._logins.__getitem__)]
        token = secrets.token_urlsafe(32)
        self._logins[token] = now + LOGIN_TOKEN_TTL
        return token

    def login(self, token: str, *, host: str = "") -> tuple[str, str]:
        """Exchange a one-time token (or the daemon's own token) for a new session at
        ``host`` (the request's Host): its id (the cookie) and CSRF token."""
        now = self._clock()
        expires = self._logins.pop(token, None)
        daemon_token = self._token is not None and hmac.compare_digest(
            token.encode(), self._token)
        if (expires is None or expires <= now) and not daemon_token:
            raise LoginRefused("dashboard login refused: the token is unknown, already used "
                               "or expired; run `kelpie dashboard` for a new link")
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._sessions = {s: v for s, v in self._sessions.items() if v.expires > now}
        self._sessions[session] = _Session(csrf, now + SESSION_TTL, host)
        return session, csrf

    def logout(self, session: str) -> None:
        self._sessions.pop(session, None)

    def csrf(self, session: str | None, *, host: str | None = None) -> str | None:
        """The CSRF token of a live session (at ``host``, if given), None for none."""
        found = self._sessions.get(session or "")
        if found is None or found.expires <= self._clock():
            return None
        if host is not None and not hmac.compare_digest(host.encode(), found.host.encode()):
            return None
        return found.csrf

    def check(self, scope: MutableMapping[str, Any]) -> str | None:
        """None if an HTTP request or WebSocket upgrade is a live session's (its cookie;
        for an unsafe request the CSRF header; its own origin where the browser says),
        else what is missing: ``no session``, or why a session's request is refused."""
        headers = {bytes(name).decode("latin-1").lower(): bytes(value).decode("latin-1")
                   for name, value in scope.get("headers", ())}
        expected = self.csrf(_cookie(headers.get("cookie", ""), COOKIE),
                             host=headers.get("host", ""))
        if expected is None:
            return NO_SESSION
        origin = headers.get("origin")
        own = {f"http://{headers.get('host', '')}", f"https://{headers.get('host', '')}"}
        if scope["type"] == "websocket":  # browsers always send Origin on an upgrade
            return None if origin in own else f"a WebSocket from origin {origin} (not this page's)"
        if scope.get("method", "GET") in SAFE_METHODS:
            return None
        if origin is not None and origin not in own:
            return f"a request from origin {origin} (not this page's)"
        if not hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(), expected.encode()):
            return f"a state-changing request without this session's {CSRF_HEADER} header"
        return None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def sessions_of(request: Request) -> DashboardSessions:
    sessions: DashboardSessions = request.app.state.dashboard
    return sessions


@router.post("/dashboard/logins")
async def new_login(request: Request) -> DashboardLogin:
    """A one-time dashboard URL (for the socket's user or a bearer-token client only: a
    dashboard session cannot mint more)."""
    if COOKIE in request.cookies and "authorization" not in request.headers:
        raise NotAllowed("a dashboard session cannot make login links; use `kelpie "
                         "dashboard`")
    listen: Callable[[], Awaitable[str]] | None = request.app.state.dashboard_address
    base = await listen() if listen else str(request.base_url).rstrip("/")
    token = sessions_of(request).mint()
    return DashboardLogin(url=f"{base}/#token={token}", expires_in=LOGIN_TOKEN_TTL)


@router.post("/dashboard/session")
async def login(request: Request, body: LoginBody, response: Response) -> DashboardSession:
    """Exchange a one-time token for a session cookie (HttpOnly, SameSite=Strict)."""
    session, csrf = sessions_of(request).login(body.token,
                                               host=request.headers.get("host", ""))
    response.set_cookie(COOKIE, session, max_age=int(SESSION_TTL), httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return DashboardSession(csrf=csrf)


@router.get("/dashboard/session")
async def current(request: Request) -> DashboardSession:
    """The session's CSRF token (a reloaded page asks for it again)."""
    csrf = sessions_of(request).csrf(request.cookies.get(COOKIE))
    if csrf is None:
        raise LoginRefused("no dashboard session: open the link `kelpie dashboard` prints")
    return DashboardSession(csrf=csrf)


@router.delete("/dashboard/session", status_code=204)
async def logout(request: Request) -> Response:
    """End the session."""
    sessions_of(request).logout(request.cookies.get(COOKIE, ""))
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


@page_router.get("/")
async def page() -> HTMLResponse:
    """The dashboard page (it holds no data: everything comes through the API)."""
    return HTMLResponse(_asset("index.html"), headers=_PAGE_HEADERS)


@page_router.get("/dashboard/{name:path}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        return Response(status_code=404)
    return Response(_asset(name), media_type=ASSETS[name], headers=_PAGE_HEADERS)


_PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                                # xterm.js styles its rows with a <style> it writes
                                "style-src 'self' 'unsafe-inline'; script-src 'self'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
    return resources.files("kelpie.daemon").joinpath("dashboard", *name.split("/")).read_bytes()


PUBLIC = {("GET", "/"), ("POST", "/v1/dashboard/session")}


def is_public(method: str, path: str) -> bool:
    """The page, its assets and the login exchange: no session needed (they hold no
    data)."""
    return (method, path) in PUBLIC or (method == "GET" and path.startswith("/dashboard/"))
