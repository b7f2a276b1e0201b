"""The dashboard's way in, against a real daemon: one-time links, the session cookie, CSRF
and Origin checks; plus the session rules on virtual time. (The page itself, in a real
browser, is in test_dashboard_browser.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon_env import KelpieHome
from kelpie.api import FleetView, model_json
from kelpie.daemon._dashboard import LOGIN_TOKEN_TTL, DashboardSessions, LoginRefused
from kelpie.fleet._model import (
    FleetHost,
    FleetSandbox,
    HostReport,
    HostStatus,
    SandboxStatus,
    view_of,
)


@pytest.fixture(scope="module")
def home() -> Iterator[KelpieHome]:
    home = KelpieHome()
    try:
        started = home.kelpie("daemon", "start", timeout=120)
        assert started.returncode == 0, started.stderr
        yield home
    finally:
        home.close()


def _link(home: KelpieHome) -> tuple[str, str]:
    """A fresh one-time link from `kelpie dashboard`: (base URL, token)."""
    done = home.kelpie("dashboard", timeout=60)
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.fragment.startswith("token=")
    return f"{parts.scheme}://{parts.netloc}", parts.fragment.removeprefix("token=")


def test_a_one_time_link_logs_in_once_and_the_cookie_is_strict(home: KelpieHome) -> None:
    base, token = _link(home)
    with httpx.Client(base_url=base) as browser:
        assert browser.get("/v1/sandboxes").status_code == 401  # nothing without a session
        page = browser.get("/")
        assert page.status_code == 200 and "Kelpie" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        login = browser.post("/v1/dashboard/session", json={"token": token})
        assert login.status_code == 200, login.text
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie, cookie
        assert browser.get("/v1/sandboxes").status_code == 200
        assert browser.get("/v1/dashboard/session").json() == login.json()
        # the cookie names this host: a page reaching the listener by another name (DNS
        # rebinding) is not the session's
        rebound = browser.get("/v1/sandboxes", headers={"Host": "rebound.test"})
        assert rebound.status_code == 401
    with httpx.Client(base_url=base) as other:  # the same token again: refused
        again = other.post("/v1/dashboard/session", json={"token": token})
        assert again.status_code == 401
        assert "already used" in again.json()["error"]["message"]
        wrong = other.post("/v1/dashboard/session", json={"token": "not-a-token"})
        assert wrong.status_code == 401


def test_a_state_changing_request_needs_the_csrf_token_and_its_own_origin(
        home: KelpieHome) -> None:
    base, token = _link(home)
    with httpx.Client(base_url=base) as browser:
        csrf = browser.post("/v1/dashboard/session", json={"token": token}).json()["csrf"]
        bare = browser.post("/v1/sandboxes/nothing-here/pause")
        assert bare.status_code == 403
        assert "X-CSRF-Token" in bare.json()["error"]["message"].replace("x-csrf-token",
                                                                          "X-CSRF-Token")
        forged = browser.post("/v1/sandboxes/nothing-here/pause",
                              headers={"X-CSRF-Token": csrf, "Origin": "http://evil.test"})
        assert forged.status_code == 403
        assert "origin http://evil.test" in forged.json()["error"]["message"]
        passed = browser.post("/v1/sandboxes/nothing-here/pause",
                              headers={"X-CSRF-Token": csrf, "Origin": base})
        assert passed.status_code == 404  # through the checks, to the API: no such sandbox
        # a session cannot mint more login links
        assert browser.post("/v1/dashboard/logins",
                            headers={"X-CSRF-Token": csrf}).status_code == 403
        assert browser.delete("/v1/dashboard/session",
                              headers={"X-CSRF-Token": csrf}).status_code == 204
        assert browser.get("/v1/sandboxes").status_code == 401  # logged out


def test_a_websocket_from_another_origin_is_refused(home: KelpieHome) -> None:
    base, token = _link(home)
    with httpx.Client(base_url=base) as browser:
        browser.post("/v1/dashboard/session", json={"token": token})
        cookie = f"kelpie_session={browser.cookies['kelpie_session']}"
    ws_url = base.replace("http", "ws") + "/v1/sandboxes/nothing-here/exec/ws"

    async def open_from(origin: str) -> str:
        try:
            async with connect(ws_url, additional_headers={"Cookie": cookie},
                               origin=origin) as ws:  # type: ignore[arg-type]
                await ws.send(json.dumps({"argv": ["true"]}))
                return str(await ws.recv())
        except InvalidStatus as exc:
            return f"refused {exc.response.status_code}"
        except ConnectionClosed as exc:
            return f"closed {exc.rcvd.code if exc.rcvd else ''}"

    assert asyncio.run(open_from("http://evil.test")).startswith(("refused 403", "closed 1008"))
    # from the page's own origin the same upgrade reaches the API (no such sandbox)
    assert "nothing-here" in asyncio.run(open_from(base))


def test_login_tokens_expire_and_sessions_end() -> None:
    now = [1000.0]
    sessions = DashboardSessions(lambda: now[0], token="daemon-token")
    token = sessions.mint()
    now[0] += LOGIN_TOKEN_TTL + 1
    with pytest.raises(LoginRefused, match="unknown, already used or expired"):
        sessions.login(token)
    session, csrf = sessions.login("daemon-token")  # a TCP daemon's own token logs in
    assert sessions.csrf(session) == csrf
    sessions.logout(session)
    assert sessions.csrf(session) is None


def _fleet_view(hosts: int, sandboxes: list[str]) -> FleetView:
    made = [FleetHost(host=f"10.0.0.{i}", status=HostStatus.UP, last_seen=1.0, reason=None,
                      sandboxes=len(sandboxes) if i == 1 else 0,
                      report=HostReport(host=f"10.0.0.{i}", address=f"http://10.0.0.{i}:7075",
                                        arches=("x86_64",), backends=("qemu",),
                                        accelerators=("tcg",), cpus=2, free_vcpus=2,
                                        memory_mib=4096, free_memory_mib=3000,
                                        free_disk_bytes=1 << 30))
            for i in range(1, hosts + 1)]
    placed = [FleetSandbox(name=name, id=None, host="10.0.0.1", generation=1,
                           status=SandboxStatus.RUNNING, state="running", reason=None,
                           memory_mib=256, cpus=1) for name in sandboxes]
    return view_of(made, placed, at=1000.0)


def test_the_fleet_view_a_controller_sends_is_shown_and_followed(home: KelpieHome) -> None:
    base, token = _link(home)
    with httpx.Client(base_url=base) as browser:
        csrf = browser.post("/v1/dashboard/session", json={"token": token}).json()["csrf"]
        missing = browser.get("/v1/fleet")
        assert missing.status_code == 404 and "in no fleet" in missing.text, missing.text
        first = _fleet_view(2, ["a"])
        shown = browser.put("/v1/fleet", json=model_json(first), headers={"X-CSRF-Token": csrf})
        assert shown.status_code == 204, shown.text
        assert FleetView.model_validate(browser.get("/v1/fleet").json()) == first
        with browser.stream("GET", "/v1/fleet", params={"follow": "true"}) as stream:
            lines = stream.iter_lines()
            assert FleetView.model_validate_json(next(lines)) == first
            second = _fleet_view(3, ["a", "b"])
            browser.put("/v1/fleet", json=model_json(second), headers={"X-CSRF-Token": csrf})
            assert FleetView.model_validate_json(next(lines)) == second
        assert [s.name for s in second.hosts[0].sandboxes] == ["a", "b"]
        assert second.hosts[0].free_memory_mib == 3000
