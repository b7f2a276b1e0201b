"""The pieces of Kelpie's E2B API that need no VM: who a caller is, their access token,
envd's end events, the SDK's metadata filter. (tests/test_e2b.py drives it all for real.)"""

from __future__ import annotations

import base64
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from conftest import real_part_missing
from kelpie.e2b import ENVD_VERSION, E2bApi
from kelpie.e2b._caller import Caller, access_token, caller_of, user_of
from kelpie.e2b._control import _metadata_filter
from kelpie.e2b._processes import _end
from kelpie.vm import ExecExit, VmState
from test_daemon import mock_runtime

ROOT = Path(__file__).resolve().parent.parent


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


def test_the_user_comes_from_basic_auth_and_defaults_to_user() -> None:
    assert user_of(None) is None and user_of("") is None
    assert user_of(basic("root")) == "root"
    caller = caller_of({"kelpie-e2b-sandbox": "abc", "authorization": basic("root")})
    assert caller == Caller("abc", "root") and caller.home == "/root"
    plain = caller_of({"kelpie-e2b-sandbox": "abc"})
    assert plain.user == "user" and plain.path("a/b") == "/home/user/a/b"
    assert plain.path("/etc") == "/etc" and plain.path("") == "/home/user"
    for bad in ("Bearer x", "Basic !!!", basic("../x"), basic(""), basic("a/b")):
        with pytest.raises(ValueError):
            user_of(bad)


def test_access_tokens_are_per_sandbox_and_per_key() -> None:
    token = access_token("key", "abc")
    assert token == access_token("key", "abc") and len(token) == 64
    assert token != access_token("key", "abd") and token != access_token("other", "abc")


def test_end_events_say_what_envd_says() -> None:
    ok = _end(ExecExit(0, 0.1)).event
    assert ok is not None and ok.value.exit_code == 0 and ok.value.exited
    assert ok.value.status == "exit status 0" and not ok.value.has_field("error")
    failed = _end(ExecExit(3, 0.1)).event
    assert failed is not None and failed.value.error == "exit status 3"
    killed = _end(ExecExit(137, 0.1, signal.SIGKILL)).event
    assert killed is not None and killed.value.exit_code == -1 and not killed.value.exited
    assert killed.value.status == "signal: killed"


def test_the_sdks_metadata_query_is_decoded() -> None:
    # the SDK sends urlencode({quote(k): quote(v)}); the query string decodes it once
    sent = urllib.parse.urlencode({urllib.parse.quote("k y"): urllib.parse.quote("v w&x")})
    assert _metadata_filter(sent) == {"k y": "v w&x"}
    assert _metadata_filter(None) == {} and _metadata_filter("") == {}


async def test_the_control_plane_over_a_mock_runtime(tmp_path: Path) -> None:
    # the control plane's answers in E2B's shapes (tests/test_e2b.py drives it with E2B's
    # SDK on QEMU; here every branch, in-process)
    async with mock_runtime(tmp_path) as runtime:
        await runtime.create_template(name="tpl", backend="mock")
        api = E2bApi(runtime, api_key="key", base="tpl")
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://e2b",
                                     headers={"X-API-Key": "key"}) as client:
            assert (await client.get("/v2/sandboxes", headers={"X-API-Key": "no"})
                    ).status_code == 401
            listed = (await client.get("/templates")).json()
            assert [(t["templateID"], t["aliases"]) for t in listed] == [("tpl", ["tpl", "base"])]
            assert (await client.get("/templates/aliases/tpl")).status_code == 200
            assert (await client.get("/templates/aliases/nope")).json()["code"] == 404
            created = await client.post("/v2/sandboxes", json={
                "templateID": "base", "timeout": 60, "autoPause": True,
                "metadata": {"team": "a b"}, "envVars": {"X": "1"}})
            assert created.status_code == 201, created.text
            body = created.json()
            sid = body["sandboxID"]
            assert body["envdAccessToken"] == access_token("key", sid)
            assert body["envdVersion"] == ENVD_VERSION and body["templateID"] == "base"
            info = (await client.get(f"/sandboxes/{sid}")).json()
            assert info["state"] == "running" and info["metadata"] == {"team": "a b"}
            assert info["lifecycle"] == {"onTimeout": "pause", "autoResume": False}
            query = urllib.parse.urlencode({"metadata": urllib.parse.urlencode(
                {"team": urllib.parse.quote("a b")})})
            assert [s["sandboxID"] for s in (await client.get(f"/v2/sandboxes?{query}")
                                             ).json()] == [sid]
            assert (await client.get("/v2/sandboxes?metadata=team%3Dother")).json() == []
            assert (await client.post(f"/sandboxes/{sid}/timeout",
                                      json={"timeout": 5})).status_code == 204
            assert (await runtime.inspect(sid)).on_timeout == "pause"
            assert (await client.post(f"/sandboxes/{sid}/pause")).status_code == 204
            assert (await client.post(f"/sandboxes/{sid}/pause")).status_code == 409
            paused = await client.get("/v2/sandboxes?state=paused")
            assert [s["state"] for s in paused.json()] == ["paused"]
            resumed = await client.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 600})
            assert resumed.status_code == 201 and resumed.json()["sandboxID"] == sid
            assert (await runtime.inspect(sid)).state is VmState.RUNNING
            again = await client.post(f"/v2/sandboxes/{sid}/connect", json={})
            assert again.status_code == 200  # running already; the timeout only extends
            expires = (await runtime.inspect(sid)).expires_at
            assert expires is not None and expires > time.time() + 500
            assert (await client.delete(f"/sandboxes/{sid}")).status_code == 204
            gone = await client.delete(f"/sandboxes/{sid}")
            assert gone.status_code == 404 and gone.headers["should-retry"] == "false"
            assert gone.json() == {"code": 404, "message": f"sandbox {sid} not found"}
            odd = await client.post("/v2/sandboxes", json={"templateID": "no/such:image"})
            assert odd.status_code == 404 and odd.json()["code"] == 404


def test_the_generated_envd_code_is_what_the_definitions_give(tmp_path: Path) -> None:
    # src/kelpie/e2b/_proto is generated from E2B's protobuf definitions in spec/e2b-envd:
    # generated again here, it must be the very same files
    if shutil.which("protoc") is None or shutil.which("protoc-gen-connectrpc") is None:
        real_part_missing("protoc and the generators (scripts/setup installs them)")
    out = tmp_path / "proto"
    subprocess.run(["bash", str(ROOT / "scripts" / "e2b-proto"), str(out)], check=True,
                   timeout=120)
    committed = ROOT / "src" / "kelpie" / "e2b" / "_proto"
    generated = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.py")}
    assert generated == {p.relative_to(committed): p.read_bytes()
                         for p in committed.rglob("*.py")}
