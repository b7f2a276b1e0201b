"""Snapshots and templates through the REST API, the CLI and the SDK (mock backend)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from daemon_env import KelpieHome
from kelpie import Sandbox as SdkSandbox
from kelpie.api import ErrorResponse, Sandbox, Snapshot, SnapshotCompatibility
from kelpie.backends import MOCK
from kelpie.daemon import create_app
from kelpie.images import ImageStore
from kelpie.runtime import Runtime
from kelpie.vm import BackendRegistry, HostInfo, ProbeResult, VmFactory
from test_daemon import Ids, mock_runtime


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with mock_runtime(tmp_path, new_id=Ids()) as runtime:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://kelpie/v1") as c:
            yield c


async def test_snapshot_restore_export_import(api: httpx.AsyncClient) -> None:
    assert (await api.post("/sandboxes", json={"name": "src"})).status_code == 201
    put = await api.put("/sandboxes/src/files", params={"path": "/tmp/a"}, content=b"kept")
    assert put.status_code == 204
    reply = await api.post("/snapshots", json={"sandbox": "src", "name": "s1"})
    assert reply.status_code == 201, reply.text
    snap = Snapshot.model_validate(reply.json())
    assert (snap.name, snap.kind, snap.sandbox_name, snap.template) == ("s1", "full", "src",
                                                                        False)
    listed = [Snapshot.model_validate(s) for s in (await api.get("/snapshots")).json()]
    assert [s.id for s in listed] == [snap.id]

    restored = await api.post("/snapshots/s1/restore", json={"name": "copy"})
    assert restored.status_code == 201, restored.text
    assert Sandbox.model_validate(restored.json()).state == "running"
    assert (await api.get("/sandboxes/copy/files", params={"path": "/tmp/a"})).content == b"kept"

    archive = await api.get("/snapshots/s1/export", params={"compress": True})
    assert archive.status_code == 200 and archive.content[:4] == b"\x28\xb5\x2f\xfd"
    imported = await api.post("/snapshot-imports", params={"name": "s2"},
                              content=archive.content)
    assert imported.status_code == 201, imported.text
    assert Snapshot.model_validate(imported.json()).name == "s2"

    broken = await api.post("/snapshot-imports", content=archive.content[:100])
    assert broken.status_code == 400
    assert ErrorResponse.model_validate(broken.json()).error.type == "SnapshotCorrupted"
    clash = await api.post("/snapshots", json={"sandbox": "src", "name": "s1"})
    assert clash.status_code == 409
    assert (await api.post("/sandboxes/src/stop")).status_code == 200
    rolled = await api.post("/snapshots/s1/restore", json={"into": "src"})
    assert rolled.status_code == 201, rolled.text
    assert Sandbox.model_validate(rolled.json()).name == "src"
    both = await api.post("/snapshots/s1/restore", json={"into": "src", "name": "x"})
    assert both.status_code == 400
    missing = await api.post("/snapshots/nosuch/restore", json={})
    assert missing.status_code == 404
    assert (await api.delete("/snapshots/s2")).status_code == 204
    assert (await api.get("/snapshots/s2")).status_code == 404


async def test_templates(api: httpx.AsyncClient) -> None:
    reply = await api.post("/templates", json={"name": "base", "env": {"T": "1"}})
    assert reply.status_code == 201, reply.text
    assert Snapshot.model_validate(reply.json()).template
    assert (await api.get("/sandboxes", params={"all": True})).json() == []
    clones = []
    for i in range(3):
        created = await api.post("/sandboxes", json={"template": "base", "env": {"I": str(i)}})
        assert created.status_code == 201, created.text
        clones.append(Sandbox.model_validate(created.json()))
    assert len({c.id for c in clones}) == 3 and all(c.env["T"] == "1" for c in clones)
    refused = await api.post("/sandboxes", json={"template": "base", "cpus": 2})
    assert refused.status_code == 400
    assert [t["name"] for t in (await api.get("/templates")).json()] == ["base"]
    assert (await api.get("/snapshots", params={"templates": False})).json() == []
    assert (await api.delete("/templates/base")).status_code == 204
    assert (await api.post("/sandboxes", json={"template": "base"})).status_code == 404


@pytest.fixture(scope="module")
def home() -> Iterator[KelpieHome]:
    home = KelpieHome()
    try:
        yield home
    finally:
        home.close()


def test_cli_snapshot_commands(home: KelpieHome, tmp_path: Path) -> None:
    def ok(*args: str) -> str:
        proc = home.kelpie("--debug", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    ok("run", "-d", "--name", "box", "--backend", "mock")
    ok("exec", "box", "--", "sh", "-c", "echo one > /tmp/f")
    assert "snap1" in ok("snapshot", "create", "box", "--name", "snap1")
    ok("exec", "box", "--", "sh", "-c", "echo two > /tmp/f")
    listed = json.loads(ok("snapshot", "ls", "--json"))
    assert [s["name"] for s in listed] == ["snap1"]
    assert json.loads(ok("snapshot", "inspect", "snap1"))[0]["sandbox_name"] == "box"

    archive = tmp_path / "snap.tar.zst"
    ok("snapshot", "export", "--compress", "snap1", str(archive))
    assert archive.stat().st_size > 0
    assert "moved" in ok("snapshot", "import", "--name", "moved", str(archive))
    restored = ok("restore", "--name", "back", "moved").strip()
    assert ok("exec", restored, "--", "cat", "/tmp/f") == "one\n"  # before, not after

    ok("template", "create", "--name", "tpl", "--backend", "mock")
    assert [t["name"] for t in json.loads(ok("template", "ls", "--json"))] == ["tpl"]
    assert ok("run", "--rm", "--template", "tpl", "--", "echo", "from template") == \
        "from template\n"
    bad = home.kelpie("restore", "nosuch")
    assert bad.returncode == 125 and "no snapshot 'nosuch'" in bad.stderr
    ok("template", "rm", "tpl")
    ok("snapshot", "rm", "snap1", "moved")
    assert json.loads(ok("snapshot", "ls", "--json")) == []


def test_sdk_snapshot_and_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KELPIE_STATE_DIR", str(tmp_path / "state"))
    with SdkSandbox.create(backend="mock") as box:
        box.files.write("/tmp/x", b"before")
        snap = box.snapshot(name="sdk-snap")
        box.files.write("/tmp/x", b"after")
        with SdkSandbox.restore("sdk-snap") as copy:
            assert copy.files.read("/tmp/x") == b"before"
        assert snap.kind == "full"
    template = SdkSandbox.create_template("sdk-tpl", backend="mock", env={"T": "1"})
    assert template.template
    with SdkSandbox.create(template="sdk-tpl") as clone:
        assert b"T=1" in clone.exec(["env"]).stdout


async def test_compatibility_says_what_a_snapshot_needs_and_why_it_would_not_restore(
        tmp_path: Path) -> None:
    registry = BackendRegistry()
    registry.register(MOCK)
    runtime = Runtime(data_dir=tmp_path / "data", images=ImageStore(tmp_path / "images"),
                      factory=VmFactory(registry, environ={"KELPIE_BACKEND": "mock"}),
                      new_id=Ids())
    async with runtime:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://kelpie/v1") as api:
            assert (await api.post("/sandboxes", json={"name": "src"})).status_code == 201
            assert (await api.post("/snapshots", json={"sandbox": "src", "name": "s1"})
                    ).status_code == 201
            reply = await api.get("/snapshots/s1/compatibility")
            assert reply.status_code == 200, reply.text
            compat = SnapshotCompatibility.model_validate(reply.json())
            assert (compat.name, compat.kind, compat.backend) == ("s1", "full", "mock")
            assert compat.arch == HostInfo.current_arch()
            assert (compat.restorable_here, compat.reasons) == (True, [])

            # the same snapshot on a host whose mock backend is switched off
            registry.register(dataclasses.replace(
                MOCK, probe=lambda: ProbeResult(False, "switched off for the test")))
            compat = SnapshotCompatibility.model_validate(
                (await api.get("/snapshots/s1/compatibility")).json())
            assert compat.restorable_here is False
            assert compat.reasons == ["backend: mock is not available on this host "
                                      "(switched off for the test)"]
            missing = await api.get("/snapshots/nope/compatibility")
            assert missing.status_code == 404
