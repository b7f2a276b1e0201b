"""The daemon: its REST API in-process, the real server (unix socket; TCP with a token),
``kelpie daemon`` and its lifecycle, the checked-in OpenAPI document, and a fuzz of every
operation from that document.

Everything runs on the mock backend (no VM boots here): in-process through a registry
holding only the mock backend, in daemon subprocesses through ``KELPIE_BACKEND=mock``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies
from schemathesis.python import asgi as st_asgi
from websockets.asyncio.client import unix_connect

from daemon_env import KELPIE, KelpieHome
from kelpie.api import (
    NDJSON,
    SANDBOX_NAME_PATTERN,
    CreateDone,
    ErrorBody,
    ErrorResponse,
    Event,
    ExecOutcome,
    FileEntry,
    Progress,
    Sandbox,
    SandboxCreate,
    VersionInfo,
)
from kelpie.backends import MOCK
from kelpie.backends.mock import MockVm
from kelpie.client import DaemonClient, RemoteError
from kelpie.daemon import DaemonOptions, create_app, serve
from kelpie.images import ImageStore
from kelpie.runtime import NAME_PATTERN, Runtime, SandboxNotFound
from kelpie.vm import (
    BackendRegistry,
    BootError,
    ConfigError,
    ExecTimeout,
    GuestFileError,
    InvalidStateError,
    KelpieError,
    SnapshotIncompatible,
    VmConfig,
    VmFactory,
    VmInstance,
    VmState,
)
from waiting import wait_for, wait_until

ROOT = Path(__file__).resolve().parent.parent
MOCK_GONE = "backend 'mock' VMs do not survive a restart"
TOKEN = "0123456789abcdef0123456789abcdef"


class Ids:
    """Sandbox ids: the given ones first, then a counter (all lowercase hex)."""

    def __init__(self, *ids: str) -> None:
        self._given = list(ids)
        self._count = 0

    def __call__(self) -> str:
        if self._given:
            return self._given.pop(0)
        self._count += 1
        return f"{self._count:012x}"


def mock_runtime(path: Path, **kw: Any) -> Runtime:
    """A runtime (not yet open) under ``path`` whose only backend, and default, is mock."""
    registry = BackendRegistry()
    registry.register(MOCK)
    return Runtime(data_dir=path / "data", images=ImageStore(path / "images"),
                   factory=VmFactory(registry, environ={"KELPIE_BACKEND": "mock"}), **kw)


def error_of(reply: httpx.Response, status: int) -> ErrorBody:
    """The error in a reply, which must have ``status`` and the documented JSON body."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    return ErrorResponse.model_validate(reply.json()).error


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ==== 1. the REST API, in-process ======================================================


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with mock_runtime(tmp_path, new_id=Ids("abc111000000", "abc222000000")) as rt:
        yield rt


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://kelpie/v1") as client:
        yield client


async def create(api: httpx.AsyncClient, **body: Any) -> Sandbox:
    reply = await api.post("/sandboxes", json=body)
    assert reply.status_code == 201, reply.text
    assert reply.headers["content-type"] == "application/json"
    return Sandbox.model_validate(reply.json())


async def run(api: httpx.AsyncClient, ref: str, argv: list[str], **body: Any) -> ExecOutcome:
    reply = await api.post(f"/sandboxes/{ref}/exec", json={"argv": argv, **body})
    assert reply.status_code == 200, reply.text
    return ExecOutcome.model_validate(reply.json())


async def test_create_answers_the_sandbox(api: httpx.AsyncClient) -> None:
    sandbox = await create(api, name="web", backend="mock", cpus=1, memory_mib=256,
                           env={"A": "1"}, labels={"team": "x"})
    assert (sandbox.name, sandbox.id, sandbox.backend, sandbox.state) == (
        "web", "abc111000000", "mock", "running")
    assert (sandbox.cpus, sandbox.memory_mib, sandbox.env, sandbox.labels) == (
        1, 256, {"A": "1"}, {"team": "x"})
    assert sandbox.crash_reason is None and sandbox.last_error is None


async def test_create_streams_progress_then_the_result(api: httpx.AsyncClient) -> None:
    reply = await api.post("/sandboxes", json={"name": "streamed"},
                           headers={"Accept": NDJSON})
    assert reply.status_code == 201
    assert reply.headers["content-type"].startswith(NDJSON)
    lines = [json.loads(line) for line in reply.text.splitlines()]
    *progress, last = lines
    assert progress and all(Progress.model_validate(p) for p in progress)
    assert any("booting sandbox streamed" in p["message"] for p in progress)
    done = CreateDone.model_validate(last)
    assert (done.sandbox.name, done.sandbox.state) == ("streamed", "running")
    assert (await api.get("/sandboxes/streamed")).json()["state"] == "running"


async def test_create_stream_refused_before_its_first_step(api: httpx.AsyncClient) -> None:
    await create(api, name="taken")
    reply = await api.post("/sandboxes", json={"name": "taken"}, headers={"Accept": NDJSON})
    assert error_of(reply, 409).type == "SandboxNameInUse"  # no 201 for nothing created
    reply = await api.post("/sandboxes", json={"cpus": 0}, headers={"Accept": NDJSON})
    assert error_of(reply, 400).type == "ConfigError"


def _broken_vm(config: VmConfig, **options: Any) -> VmInstance:
    raise BootError("the host ran out of VMs")


async def test_create_stream_ends_with_the_error(tmp_path: Path) -> None:
    runtime = mock_runtime(tmp_path)
    runtime.factory.registry.register(dataclasses.replace(MOCK, name="broken",
                                                          create=_broken_vm))
    async with runtime, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(runtime)),
                                          base_url="http://kelpie/v1") as api:
        reply = await api.post("/sandboxes", json={"name": "b", "backend": "broken"},
                               headers={"Accept": NDJSON})
        assert reply.status_code == 201  # sent with the first step, before the failure
        *progress, last = [json.loads(line) for line in reply.text.splitlines()]
        assert [p["type"] for p in progress] == ["progress"]
        assert last["type"] == "error"
        error = ErrorBody.model_validate(last["error"])
        assert error.type == "BootError" and "ran out of VMs" in error.message
        kept = Sandbox.model_validate((await api.get("/sandboxes/b")).json())
        assert kept.state == "stopped" and "ran out of VMs" in (kept.last_error or "")


async def test_list_and_get_by_name_id_and_prefix(api: httpx.AsyncClient) -> None:
    one = await create(api, name="one")
    two = await create(api)
    assert (one.id, two.id) == ("abc111000000", "abc222000000")
    assert two.name  # a generated one
    await api.post("/sandboxes/one/stop")

    listed = (await api.get("/sandboxes")).json()
    assert [s["id"] for s in listed] == [two.id]
    every = [Sandbox.model_validate(s) for s in (await api.get("/sandboxes?all=true")).json()]
    assert [(s.id, s.state) for s in every] == [(one.id, "stopped"), (two.id, "running")]

    for ref in ("one", one.id, "abc1", "abc111"):
        assert (await api.get(f"/sandboxes/{ref}")).json()["id"] == one.id
    assert (await api.get(f"/sandboxes/{two.name}")).json()["id"] == two.id
    ambiguous = error_of(await api.get("/sandboxes/abc"), 409)
    assert ambiguous.type == "AmbiguousSandbox" and "matches 2 sandboxes" in ambiguous.message
    assert "too short" in error_of(await api.get("/sandboxes/ab"), 404).message


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/sandboxes/nope"),
    ("DELETE", "/sandboxes/nope"),
    ("GET", "/sandboxes/nope/events"),
    ("GET", "/sandboxes/nope/logs"),
    ("GET", "/sandboxes/nope/logs?follow=true"),
    ("POST", "/sandboxes/nope/start"),
    ("POST", "/sandboxes/nope/stop"),
    ("POST", "/sandboxes/nope/kill"),
    ("POST", "/sandboxes/nope/pause"),
    ("POST", "/sandboxes/nope/resume"),
    ("GET", "/sandboxes/nope/files?path=/etc/hostname"),
    ("PUT", "/sandboxes/nope/files?path=/tmp/x"),
    ("DELETE", "/sandboxes/nope/files?path=/tmp/x"),
    ("GET", "/sandboxes/nope/dir?path=/"),
])
async def test_unknown_sandbox_is_404(api: httpx.AsyncClient, method: str, path: str) -> None:
    error = error_of(await api.request(method, path, content=b"x" if method == "PUT" else None),
                     404)
    assert error.type == "SandboxNotFound"
    assert error.types == ["SandboxNotFound", "SandboxError", "KelpieError"]
    assert error.message.startswith("no sandbox 'nope'")


async def test_unknown_sandbox_exec_is_404(api: httpx.AsyncClient) -> None:
    reply = await api.post("/sandboxes/nope/exec", json={"argv": ["true"]})
    assert error_of(reply, 404).type == "SandboxNotFound"


async def test_name_clash_is_409(api: httpx.AsyncClient) -> None:
    first = await create(api, name="dup")
    error = error_of(await api.post("/sandboxes", json={"name": "dup"}), 409)
    assert error.type == "SandboxNameInUse" and first.id in error.message
    assert len((await api.get("/sandboxes?all=true")).json()) == 1


@pytest.mark.parametrize(("body", "problem"), [
    ({"cpus": 0}, "vcpus is 0"),
    ({"memory_mib": 1}, "memory"),
    ({"volumes": ["no-colon"]}, "volume 'no-colon'"),
    ({"volumes": ["/tmp:/mnt:rx"]}, "HOST:GUEST:ro|rw"),
    ({"env": {"A=B": "x"}}, "env name 'A=B' is invalid"),
    ({"env": {"": "x"}}, "env name '' is invalid"),
    ({"ports": ["eighty"]}, "'eighty' is not a port mapping"),
    ({"name": "bad name!"}, "not a valid sandbox name"),
    ({"command": []}, "an empty main command needs an image"),
])
async def test_bad_create_is_400(api: httpx.AsyncClient, body: dict[str, Any],
                                 problem: str) -> None:
    error = error_of(await api.post("/sandboxes", json=body), 400)
    assert error.type == "ConfigError"
    assert any(problem in p for p in error.problems), error.problems
    assert (await api.get("/sandboxes?all=true")).json() == []


async def test_unknown_backend_is_the_requests_fault(api: httpx.AsyncClient) -> None:
    for headers in ({}, {"Accept": NDJSON}):
        error = error_of(await api.post("/sandboxes", json={"backend": "nope"},
                                        headers=headers), 400)
        assert error.type == "UnknownBackend" and "BackendUnavailable" in error.types
        assert "unknown backend 'nope'; known backends: mock" in error.message
    assert (await api.get("/sandboxes?all=true")).json() == []


def test_documented_patterns_are_the_runtimes() -> None:
    assert f"^{NAME_PATTERN}$" == SANDBOX_NAME_PATTERN


@pytest.mark.parametrize(("body", "where"), [
    ({"network": "bridge"}, "network"),
    ({"cpus": "two"}, "cpus"),
    ({"env": ["A=1"]}, "env"),
    ({"surprise": True}, "surprise"),
    ({"volumes": ["a:b"] * 17}, "volumes"),
])
async def test_malformed_create_is_422(api: httpx.AsyncClient, body: dict[str, Any],
                                       where: str) -> None:
    error = error_of(await api.post("/sandboxes", json=body), 422)
    assert error.type == "ConfigError"
    assert any(where in p for p in error.problems), error.problems


async def test_unparsable_body_is_a_json_error(api: httpx.AsyncClient) -> None:
    for content in (b"{", b"\xff\x00", b"[]"):
        reply = await api.post("/sandboxes", content=content,
                               headers={"Content-Type": "application/json"})
        assert reply.status_code in (400, 422), reply.text
        assert error_of(reply, reply.status_code).type == "ConfigError"


async def test_exec_runs_to_completion(api: httpx.AsyncClient) -> None:
    await create(api, name="box")
    outcome = await run(api, "box", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (outcome.exit_code, outcome.signal) == (3, None)
    assert base64.b64decode(outcome.stdout) == b"out\n"
    assert base64.b64decode(outcome.stderr) == b"err\n"
    data = bytes(range(256))
    echoed = await run(api, "box", ["cat"], stdin=b64(data))
    assert (echoed.exit_code, base64.b64decode(echoed.stdout)) == (0, data)
    env = await run(api, "box", ["sh", "-c", "env; pwd"], env={"GREETING": "hi"}, cwd="/tmp")
    assert base64.b64decode(env.stdout).splitlines()[-1] == b"/tmp"
    assert b"GREETING=hi" in base64.b64decode(env.stdout).splitlines()
    assert (await run(api, "box", ["no-such-command"])).exit_code == 127


async def test_exec_errors(api: httpx.AsyncClient) -> None:
    await create(api, name="box")
    timeout = error_of(await api.post("/sandboxes/box/exec",
                                      json={"argv": ["sleep", "5"], "timeout": 0.05}), 504)
    assert timeout.type == "ExecTimeout" and "timed out" in timeout.message
    bad_stdin = error_of(await api.post("/sandboxes/box/exec",
                                        json={"argv": ["cat"], "stdin": "not base64!"}), 400)
    assert bad_stdin.problems == ["stdin is not valid base64"]
    assert error_of(await api.post("/sandboxes/box/exec", json={"argv": []}), 422).problems
    assert error_of(await api.post("/sandboxes/box/exec", json={}), 422).type == "ConfigError"
    await api.post("/sandboxes/box/stop")
    stopped = error_of(await api.post("/sandboxes/box/exec", json={"argv": ["true"]}), 409)
    assert "InvalidStateError" in stopped.types and "stopped" in stopped.message


async def test_files_round_trip(api: httpx.AsyncClient) -> None:
    await create(api, name="box")
    data = b"\x00binary\xff" * 1000
    reply = await api.put("/sandboxes/box/files", params={"path": "/tmp/f.bin", "mode": 0o600},
                          content=data)
    assert reply.status_code == 204 and reply.content == b""
    got = await api.get("/sandboxes/box/files", params={"path": "/tmp/f.bin"})
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "application/octet-stream"
    listing = await api.get("/sandboxes/box/dir", params={"path": "/tmp"})
    entries = {e.name: e for e in map(FileEntry.model_validate, listing.json())}
    assert (entries["f.bin"].type, entries["f.bin"].size, entries["f.bin"].mode & 0o777) == (
        "file", len(data), 0o600)

    assert (await api.put("/sandboxes/box/files", params={"path": "/tmp/empty"},
                          content=b"")).status_code == 204
    assert (await api.get("/sandboxes/box/files", params={"path": "/tmp/empty"})).content == b""

    removed = await api.delete("/sandboxes/box/files", params={"path": "/tmp/f.bin"})
    assert removed.status_code == 204
    missing = error_of(await api.get("/sandboxes/box/files", params={"path": "/tmp/f.bin"}),
                       404)
    assert missing.type == "GuestFileError" and "ENOENT" in missing.message
    assert error_of(await api.delete("/sandboxes/box/files", params={"path": "/tmp/f.bin"}),
                    404).type == "GuestFileError"

    await run(api, "box", ["mkdir", "-p", "/tmp/tree/sub"])
    await api.put("/sandboxes/box/files", params={"path": "/tmp/tree/sub/x"}, content=b"x")
    assert error_of(await api.delete("/sandboxes/box/files", params={"path": "/tmp/tree"}),
                    409).type == "GuestFileError"
    assert (await api.delete("/sandboxes/box/files",
                             params={"path": "/tmp/tree", "recursive": True})).status_code == 204
    assert "tree" not in {e["name"] for e in
                          (await api.get("/sandboxes/box/dir", params={"path": "/tmp"})).json()}


async def test_file_paths_are_checked(api: httpx.AsyncClient) -> None:
    await create(api, name="box")
    relative = error_of(await api.get("/sandboxes/box/files", params={"path": "etc/hostname"}),
                        400)
    assert relative.type == "ConfigError" and "absolute" in relative.problems[0]
    assert error_of(await api.get("/sandboxes/box/files"), 422).type == "ConfigError"
    assert error_of(await api.put("/sandboxes/box/files",
                                  params={"path": "/tmp/x", "mode": 0o10000}, content=b""),
                    422).type == "ConfigError"


async def test_logs(api: httpx.AsyncClient) -> None:
    sandbox = await create(api, name="main",
                           command=["sh", "-c", "echo one; echo two >&2; echo three"])
    assert sandbox.command == ["sh", "-c", "echo one; echo two >&2; echo three"]
    async def main_exited() -> bool:
        return (await api.get("/sandboxes/main")).json()["main_exit_code"] is not None

    await wait_until(main_exited, 10, "the main command to exit")
    assert (await api.get("/sandboxes/main")).json()["main_exit_code"] == 0
    logs = await api.get("/sandboxes/main/logs")
    assert logs.status_code == 200 and logs.headers["content-type"] == "application/octet-stream"
    assert logs.content == b"one\ntwo\nthree\n"
    assert (await api.get("/sandboxes/main/logs", params={"tail": 1})).content == b"three\n"
    assert (await api.get("/sandboxes/main/logs", params={"tail": 0})).content == b""
    assert (await api.get("/sandboxes/main/logs", params={"console": True})).status_code == 200
    assert error_of(await api.get("/sandboxes/main/logs", params={"tail": -1}), 422).problems

    # follow streams until the sandbox is at rest
    follow = asyncio.create_task(api.get("/sandboxes/main/logs", params={"follow": True}))
    await asyncio.sleep(0.05)
    assert not follow.done()
    await api.post("/sandboxes/main/stop")
    followed = await asyncio.wait_for(follow, 5)
    assert followed.content == b"one\ntwo\nthree\n"


async def test_lifecycle_and_events(api: httpx.AsyncClient) -> None:
    await create(api, name="life")

    async def act(action: str, state: str, **params: Any) -> None:
        reply = await api.post(f"/sandboxes/life/{action}", params=params)
        assert reply.status_code == 200, reply.text
        assert Sandbox.model_validate(reply.json()).state == state

    await act("pause", "paused")
    assert error_of(await api.post("/sandboxes/life/exec", json={"argv": ["true"]}), 409)
    assert error_of(await api.post("/sandboxes/life/pause"), 409).type == "InvalidStateError"
    await act("resume", "running")
    await act("stop", "stopped", timeout=5)
    await act("stop", "stopped")  # at rest already: a no-op
    await act("start", "running")
    assert error_of(await api.post("/sandboxes/life/start"), 409).type == "SandboxStateError"
    await act("kill", "stopped")
    await act("start", "running")
    assert error_of(await api.post("/sandboxes/life/stop", params={"timeout": -1}), 422)

    running = error_of(await api.delete("/sandboxes/life"), 409)
    assert running.type == "SandboxStateError" and "force" in running.message
    events = [Event.model_validate(e) for e in (await api.get("/sandboxes/life/events")).json()]
    assert [e.state for e in events] == [
        "created", "starting", "running", "paused", "running", "stopped", "starting",
        "running", "stopped", "starting", "running"]
    assert [e.at for e in events] == sorted(e.at for e in events)

    removed = await api.delete("/sandboxes/life", params={"force": True})
    assert removed.status_code == 204 and removed.content == b""
    assert error_of(await api.get("/sandboxes/life"), 404).type == "SandboxNotFound"
    assert error_of(await api.get("/sandboxes/life/events"), 404).type == "SandboxNotFound"


async def test_version_images_and_shutdown(runtime: Runtime) -> None:
    calls: list[bool] = []
    app = create_app(runtime, on_shutdown=calls.append)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://kelpie/v1") as api:
        version = VersionInfo.model_validate((await api.get("/version")).json())
        assert (version.api_version, version.pid) == ("v1", os.getpid())
        assert version.data_dir == str(runtime.data_dir)
        assert (await api.get("/images")).json() == []
        await create(api, name="a")
        assert (await api.post("/shutdown")).status_code == 202
        assert calls == [False]
        assert (await api.get("/sandboxes/a")).json()["state"] == "running"
        assert (await api.post("/shutdown?stop_sandboxes=true")).status_code == 202
        assert calls == [False, True]
        assert (await api.get("/sandboxes/a")).json()["state"] == "stopped"


async def test_unknown_routes_answer_the_error_body(api: httpx.AsyncClient) -> None:
    missing = error_of(await api.get("/no/such/route"), 404)
    assert missing.type == "KelpieError" and "Not Found" in missing.message
    reply = await api.request("PATCH", "/sandboxes")
    assert error_of(reply, 405).message == "Method Not Allowed"
    assert set(reply.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    files = await api.request("PATCH", "/sandboxes/x/files?path=/a")
    assert set(files.headers["allow"].replace(" ", "").split(",")) == {"GET", "PUT", "DELETE"}


# ==== 2. the real server on its unix socket; the exec WebSocket ========================


@dataclasses.dataclass
class Served:
    runtime: Runtime
    client: DaemonClient
    run_dir: Path

    @property
    def socket(self) -> Path:
        return self.run_dir / "kelpie.sock"


async def _until_ready(read_fd: int, server: asyncio.Task[None]) -> None:
    """Wait for the daemon's ``ready`` line (or its failure)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bytes] = loop.create_future()
    loop.add_reader(read_fd, lambda: ready.done() or ready.set_result(os.read(read_fd, 64)))
    try:
        await asyncio.wait({ready, server}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(read_fd)
    if server.done():
        server.result()  # the daemon's error
    assert ready.done() and ready.result() == b"ready\n"


@contextlib.asynccontextmanager
async def serving(runtime: Runtime, run_dir: Path, **options: Any) -> AsyncIterator[Served]:
    """``serve`` as a task of this event loop, stopped by ``POST /v1/shutdown``."""
    read_fd, write_fd = os.pipe()
    server = asyncio.create_task(serve(DaemonOptions(run_dir=run_dir, ready_fd=write_fd,
                                                     **options), runtime))
    try:
        await _until_ready(read_fd, server)
    except BaseException:
        server.cancel()
        with contextlib.suppress(OSError):
            os.close(write_fd)  # serve closes it only once ready
        raise
    finally:
        os.close(read_fd)
    client = DaemonClient(f"unix://{run_dir / 'kelpie.sock'}")
    try:
        yield Served(runtime, client, run_dir)
    finally:
        with contextlib.suppress(Exception):
            await client.shutdown()
        await client.close()
        try:
            await asyncio.wait_for(server, 10)
        finally:
            server.cancel()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a unix socket path has at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kd", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(tmp_path: Path, short_dir: Path) -> AsyncIterator[Served]:
    async with serving(mock_runtime(tmp_path), short_dir / "run") as served:
        await served.client.create(SandboxCreate(name="box"))
        yield served


async def test_socket_is_private(tmp_path: Path, short_dir: Path) -> None:
    run_dir = short_dir / "run"
    run_dir.mkdir(mode=0o755)
    os.chmod(run_dir, 0o755)
    async with serving(mock_runtime(tmp_path), run_dir) as served:
        assert stat.S_ISSOCK(served.socket.lstat().st_mode)
        assert stat.S_IMODE(served.socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert (run_dir / "daemon.pid").read_text() == f"{os.getpid()}\n"
        assert (await served.client.version()).pid == os.getpid()
    assert not served.socket.exists() and not (run_dir / "daemon.pid").exists()


# ---- a daemon's errors, typed: their class and their attributes, picklable -------------
RAISED_IN_THE_DAEMON = [
    GuestFileError("/etc/missing", "ENOENT", "no such file or directory"),
    ExecTimeout(["sleep", "9"], 1.5, b"out \x00\xff", b"err"),
    SnapshotIncompatible(["CPU model: snapshot is a, host is b", "machine: q35 vs pc"]),
    InvalidStateError("vm1", "pause", VmState.STOPPED, [VmState.RUNNING, VmState.PAUSED]),
    SandboxNotFound("nope"),
    ConfigError(["cpus: 0 is below 1", "memory_mib: -1 is below 64"], what="sandbox"),
]


def _attributes(error: BaseException) -> dict[str, Any]:
    return {k: v for k, v in vars(error).items() if not k.startswith("_")}


def _assert_same_error(error: BaseException, raised: KelpieError) -> None:
    assert isinstance(error, type(raised)) and isinstance(error, RemoteError)
    assert str(error) == str(raised)
    for name, value in _attributes(raised).items():
        assert getattr(error, name) == value, name


@pytest.mark.parametrize("raised", RAISED_IN_THE_DAEMON, ids=lambda e: type(e).__name__)
async def test_a_daemons_error_has_its_class_and_attributes(
    served: Served, monkeypatch: pytest.MonkeyPatch, raised: KelpieError,
) -> None:
    async def failing(ref: str) -> None:
        raise raised

    monkeypatch.setattr(served.runtime, "inspect", failing)
    with pytest.raises(type(raised)) as caught:
        await served.client.inspect("box")
    _assert_same_error(caught.value, raised)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is type(caught.value)
    _assert_same_error(copy, raised)


async def test_real_daemon_errors_carry_their_attributes(served: Served) -> None:
    with pytest.raises(GuestFileError) as missing:
        await served.client.read_file("box", "/tmp/no/such")
    assert (missing.value.path, missing.value.code) == ("/tmp/no/such", "ENOENT")
    with pytest.raises(ExecTimeout) as slow:
        await served.client.exec("box", ["sleep", "5"], timeout=0.05)
    assert (slow.value.argv, slow.value.timeout) == (("sleep", "5"), 0.05)
    assert (slow.value.stdout, slow.value.stderr) == (b"", b"")
    with pytest.raises(SandboxNotFound) as unknown:
        await served.client.inspect("nope")
    assert unknown.value.ref == "nope"
    await served.client.pause("box")
    with pytest.raises(InvalidStateError) as paused:
        await served.client.pause("box")
    assert paused.value.operation == "pause" and paused.value.current == "paused"


async def test_exec_stream_stdin_round_trip(served: Served) -> None:
    async with served.client.exec_stream("box", ["cat"]) as process:
        for chunk in (b"hello ", b"\x00\xff binary ", b"world\n"):
            await process.write_stdin(chunk)
        await process.close_stdin()
        result = await process.wait()
    assert (result.exit_code, result.signal) == (0, None)
    assert result.stdout == b"hello \x00\xff binary world\n" and result.stderr == b""


async def test_exec_stream_output_and_exit_codes(served: Served) -> None:
    for code in (0, 1, 7, 255):
        async with served.client.exec_stream(
            "box", ["sh", "-c", f"echo out; echo err >&2; exit {code}"],
        ) as process:
            result = await process.wait()
        assert (result.exit_code, result.stdout, result.stderr) == (code, b"out\n", b"err\n")
    async with served.client.exec_stream("box", ["sh", "-c", "env; pwd"],
                                         env={"X": "y"}, cwd="/tmp") as process:
        lines = (await process.wait()).stdout.splitlines()
    assert b"X=y" in lines and lines[-1] == b"/tmp"


async def test_exec_stream_signal(served: Served) -> None:
    async with served.client.exec_stream("box", ["sleep", "30"]) as process:
        await process.send_signal(signal.SIGTERM)
        result = await asyncio.wait_for(process.wait(), 10)
    assert (result.exit_code, result.signal) == (128 + signal.SIGTERM, signal.SIGTERM)


async def test_exec_stream_timeout(served: Served) -> None:
    async with served.client.exec_stream("box", ["sleep", "30"], timeout=0.1) as process:
        with pytest.raises(ExecTimeout):
            await asyncio.wait_for(process.wait(), 10)


async def test_exec_stream_errors(served: Served) -> None:
    with pytest.raises(RemoteError) as unknown:
        async with served.client.exec_stream("nope", ["true"]):
            pass
    assert unknown.value.is_a("SandboxNotFound") and unknown.value.status == 404
    assert unknown.value.type == "SandboxNotFound"

    await served.client.stop("box")
    with pytest.raises(RemoteError) as stopped:
        async with served.client.exec_stream("box", ["true"]):
            pass
    assert stopped.value.is_a("InvalidStateError") and stopped.value.status == 409


async def test_exec_stream_bad_messages(served: Served) -> None:
    url = "ws://kelpie/v1/sandboxes/box/exec/ws"
    async with unix_connect(str(served.socket), url) as ws:
        await ws.send(json.dumps({"argv": []}))
        error = json.loads(await ws.recv())
    assert error["type"] == "error" and error["error"]["type"] == "ConfigError"
    assert any("argv" in p for p in error["error"]["problems"])

    async with unix_connect(str(served.socket), url) as ws:
        await ws.send(b"\x01binary first")
        error = json.loads(await ws.recv())
    assert error["type"] == "error" and error["error"]["type"] == "ConfigError"

    async with unix_connect(str(served.socket), url) as ws:
        await ws.send(json.dumps({"argv": ["cat"]}))
        assert json.loads(await ws.recv()) == {"type": "started"}
        await ws.send(json.dumps({"type": "resize"}))  # no rows/cols
        error = json.loads(await ws.recv())
    assert error["type"] == "error" and "resize needs rows and cols" in error["error"]["message"]


async def test_exec_stream_hang_up_kills_the_command(served: Served) -> None:
    box = await served.runtime.inspect("box")
    vm = served.runtime._vms[box.id]
    assert isinstance(vm, MockVm)
    async with served.client.exec_stream("box", ["sleep", "30"]):
        assert vm.running_processes == 1
    await wait_until(lambda: vm.running_processes == 0, 10, "the hung-up command to be killed")
    assert vm.running_processes == 0
    assert (await served.client.exec("box", ["true"])).exit_code == 0  # still serving


@contextlib.asynccontextmanager
async def _ndjson_exec(served: Served, body: dict[str, Any],
                       ) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.Response]]:
    transport = httpx.AsyncHTTPTransport(uds=str(served.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://kelpie/v1") as http, \
            http.stream("POST", "/sandboxes/box/exec", json=body,
                        headers={"Accept": "application/x-ndjson"}) as response:
        yield http, response


async def test_ndjson_exec_streams_output_then_the_exit(served: Served) -> None:
    script = "echo out; echo err >&2; exit 3"
    async with _ndjson_exec(served, {"argv": ["sh", "-c", script], "env": {"X": "y"}}) as (
            _, response):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in response.aiter_lines()]
    assert lines[0]["type"] == "started" and len(lines[0]["exec_id"]) == 16
    output = {(m["stream"], base64.b64decode(m["data"])) for m in lines[1:-1]}
    assert output == {("stdout", b"out\n"), ("stderr", b"err\n")}
    assert lines[-1]["type"] == "exit" and lines[-1]["exit_code"] == 3


async def test_ndjson_exec_takes_stdin_and_signals(served: Served) -> None:
    stdin = base64.b64encode(b"in \x00\xff").decode()
    async with _ndjson_exec(served, {"argv": ["cat"], "stdin": stdin}) as (_, response):
        lines = [json.loads(line) async for line in response.aiter_lines()]
    assert base64.b64decode(lines[1]["data"]) == b"in \x00\xff"
    async with _ndjson_exec(served, {"argv": ["sleep", "30"]}) as (http, response):
        reader = response.aiter_lines()
        exec_id = json.loads(await anext(reader))["exec_id"]
        signal_path = f"/sandboxes/box/exec/{exec_id}/signal"
        assert (await http.post(signal_path, json={"signal": 99})).status_code == 422
        other = await served.client.create(SandboxCreate(name="other"))
        wrong_box = await http.post(f"/sandboxes/{other.id}/exec/{exec_id}/signal",
                                    json={"signal": int(signal.SIGTERM)})
        assert wrong_box.status_code == 404 and wrong_box.json()["error"]["type"] == "ExecNotFound"
        sent = await http.post(signal_path, json={"signal": int(signal.SIGTERM)})
        assert sent.status_code == 204
        end = json.loads(await anext(reader))
    assert (end["exit_code"], end["signal"]) == (128 + signal.SIGTERM, signal.SIGTERM)
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(served.socket)),
                                 base_url="http://kelpie/v1") as http:
        gone = await http.post(signal_path, json={"signal": int(signal.SIGTERM)})
    assert gone.status_code == 404 and exec_id in gone.json()["error"]["message"]


async def test_ndjson_exec_errors_and_timeouts(served: Served) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(served.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://kelpie/v1") as http:
        unknown = await http.post("/sandboxes/nope/exec", json={"argv": ["true"]},
                                  headers={"Accept": "application/x-ndjson"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "SandboxNotFound"
    async with _ndjson_exec(served, {"argv": ["sleep", "30"], "timeout": 0.1}) as (_, response):
        end = [json.loads(line) async for line in response.aiter_lines()][-1]
    assert end["type"] == "exit" and end["timed_out"] is True
    await served.client.stop("box")
    async with _ndjson_exec(served, {"argv": ["true"]}) as (_, response):
        await response.aread()
    assert response.status_code == 409 and "InvalidStateError" in response.json()["error"]["types"]


async def test_ndjson_exec_hang_up_kills_the_command(served: Served) -> None:
    box = await served.runtime.inspect("box")
    vm = served.runtime._vms[box.id]
    assert isinstance(vm, MockVm)
    async with _ndjson_exec(served, {"argv": ["sleep", "30"]}) as (_, response):
        await anext(response.aiter_lines())  # started: the command runs
        assert vm.running_processes == 1
    await wait_until(lambda: vm.running_processes == 0, 10, "the hung-up command to be killed")
    assert (await served.client.exec("box", ["true"])).exit_code == 0  # still serving


async def test_client_over_the_socket(served: Served) -> None:
    client = served.client
    progress: list[str] = []
    made = await client.create(SandboxCreate(name="other", command=["echo", "main"]),
                               progress=progress.append)
    assert made.state == "running" and any("booting sandbox other" in p for p in progress)
    assert [s.name for s in await client.list_sandboxes()] == ["box", "other"]
    assert (await client.inspect(made.id[:5])).name == "other"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 1000

    await client.write_file("box", "/tmp/big", chunks(), mode=0o640)
    assert await client.read_file("box", "/tmp/big") == b"".join(bytes([i]) * 1000
                                                                  for i in range(50))
    streamed = b"".join([c async for c in client.read_file_stream("box", "/tmp/big")])
    assert len(streamed) == 50_000
    assert {(f.name, f.size) for f in await client.list_dir("box", "/tmp")} >= {
        ("big", 50_000)}
    await client.remove_path("box", "/tmp/big")
    with pytest.raises(RemoteError) as missing:
        await client.read_file("box", "/tmp/big")
    assert missing.value.status == 404 and missing.value.is_a("GuestFileError")

    result = await client.exec("box", ["cat"], stdin=b"in")
    assert (result.exit_code, result.stdout) == (0, b"in")
    async def other_exited() -> bool:
        return (await client.inspect("other")).main_exit_code is not None

    await wait_until(other_exited, 10, "the main command of 'other' to exit")
    assert await client.read_logs("other") == b"main\n"
    assert (await client.pause("box")).state == "paused"
    assert (await client.resume("box")).state == "running"
    assert (await client.stop("box", timeout=0)).state == "stopped"
    assert (await client.start("box")).state == "running"
    assert (await client.kill("other")).state == "stopped"
    assert b"".join([c async for c in client.follow_logs("other")]) == b"main\n"
    assert [e.state for e in await client.events("other")][-1] == "stopped"
    await client.remove("other")
    with pytest.raises(RemoteError) as gone:
        await client.inspect("other")
    assert gone.value.is_a("SandboxNotFound")
    with pytest.raises(SandboxNotFound):  # the class the daemon raised, as in-process
        await client.inspect("other")
    with pytest.raises(InvalidStateError):
        await client.resume("box")  # it runs
    with pytest.raises(RemoteError) as invalid:
        await client.create(SandboxCreate(name="x", cpus=0))
    assert invalid.value.is_a("ConfigError") and invalid.value.problems


# ==== 3 and 4. the `kelpie daemon` command: security and lifecycle =====================


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        return probe.connect_ex(str(path)) == 0


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for init to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def home(tmp_path: Path) -> Iterator[KelpieHome]:
    home = KelpieHome(tmp_path)
    home.env["KELPIE_BACKEND"] = "mock"
    try:
        yield home
    finally:
        home.close()


@dataclasses.dataclass
class TcpDaemon:
    home: KelpieHome
    port: int
    token_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpDaemon]:
    home = KelpieHome(tmp_path_factory.mktemp("tcp"))
    home.env["KELPIE_BACKEND"] = "mock"
    token_file = home.root / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    try:
        started = home.kelpie("daemon", "start", "--tcp", f"127.0.0.1:{port}",
                              "--token-file", str(token_file))
        assert started.returncode == 0, started.stderr
        yield TcpDaemon(home, port, token_file)
    finally:
        home.close()  # kelpie daemon stop
    assert not listening(port) and not home.socket.exists()


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer wrong-token-wrong-token", f"Basic {TOKEN}",
    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"{TOKEN}",
])
def test_tcp_needs_the_token(tcp_daemon: TcpDaemon, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/v1/version"), ("GET", "/v1/sandboxes"),
                         ("POST", "/v1/shutdown"), ("GET", "/openapi.json"),
                         ("GET", "/v1/no-such-route")):
        reply = httpx.request(method, tcp_daemon.url + path, headers=headers)
        assert reply.status_code == 401, (method, path, reply.text)
        assert reply.headers["www-authenticate"] == "Bearer"
        error = error_of(reply, 401)
        assert "Authorization: Bearer" in error.message
    assert listening(tcp_daemon.port)  # the shutdown above was refused


def test_tcp_with_the_token(tcp_daemon: TcpDaemon) -> None:
    for scheme in ("Bearer", "bearer"):
        reply = httpx.get(tcp_daemon.url + "/v1/version",
                          headers={"Authorization": f"{scheme} {TOKEN}"})
        assert reply.status_code == 200, reply.text
        assert VersionInfo.model_validate(reply.json()).pid == tcp_daemon.home.daemon_pid()
    # the unix socket needs no token, even with a TCP listener
    assert tcp_daemon.home.kelpie("--no-autostart", "ps").returncode == 0
    # and the CLI reaches the TCP listener with --token-file, not without
    host = ["--host", tcp_daemon.url]
    listed = tcp_daemon.home.kelpie(*host, "--token-file", str(tcp_daemon.token_file), "ps")
    assert listed.returncode == 0, listed.stderr
    refused = tcp_daemon.home.kelpie(*host, "ps")
    assert refused.returncode == 125 and "unauthorized" in refused.stderr


async def test_tcp_exec_stream_needs_the_token(tcp_daemon: TcpDaemon) -> None:
    async with DaemonClient(tcp_daemon.url, token=TOKEN) as client:
        sandbox = await client.create(SandboxCreate(name=f"ws{os.getpid()}"))
        async with client.exec_stream(sandbox.id, ["echo", "over tcp"]) as process:
            assert (await process.wait()).stdout == b"over tcp\n"
        for token in (None, "wrong-token-wrong-token"):
            async with DaemonClient(tcp_daemon.url, token=token) as anonymous:
                with pytest.raises(RemoteError) as refused:
                    async with anonymous.exec_stream(sandbox.id, ["echo", "no"]):
                        pass
                assert refused.value.status in (401, 403)
                assert "refused the exec stream" in str(refused.value)
        await client.remove(sandbox.id, force=True)


def test_tcp_without_a_token_is_refused(home: KelpieHome) -> None:
    port = free_port()
    proc = home.kelpie("daemon", "run", "--tcp", f"127.0.0.1:{port}", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "a TCP listener needs a token (--token-file)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not listening(port) and not home.socket.exists()


@pytest.mark.parametrize(("content", "problem"), [
    ("short\n", "is 5 characters; give at least 16"),
    ("", "is 0 characters"),
    ("\n  \n", "is 0 characters"),
    (None, "cannot read the token file"),
])
def test_bad_token_file_is_refused(home: KelpieHome, content: str | None,
                                   problem: str) -> None:
    token_file = home.root / "token"
    if content is not None:
        token_file.write_text(content)
    port = free_port()
    proc = home.kelpie("daemon", "run", "--tcp", f"127.0.0.1:{port}",
                       "--token-file", str(token_file), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert problem in proc.stderr
    assert not listening(port) and not home.socket.exists()


def status(home: KelpieHome) -> dict[str, Any]:
    proc = home.kelpie("--no-autostart", "daemon", "status", "--json")
    info: dict[str, Any] = json.loads(proc.stdout)
    assert proc.returncode == (0 if info["running"] else 1)
    return info


def test_daemon_start_status_stop(home: KelpieHome) -> None:
    first = home.kelpie("daemon", "start")
    assert first.returncode == 0, first.stderr
    pid = home.daemon_pid()
    assert pid is not None and f"kelpie daemon started (pid {pid})" in first.stdout
    again = home.kelpie("daemon", "start")
    assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    assert home.daemon_pid() == pid

    info = status(home)
    assert info["running"] is True
    assert (info["pid"], info["data_dir"], info["api_version"]) == (pid, str(home.state), "v1")
    assert info["url"] == f"unix://{home.socket}"
    assert stat.S_IMODE(home.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.run_dir.stat().st_mode) == 0o700

    stopped = home.kelpie("daemon", "stop")
    assert stopped.returncode == 0 and f"kelpie daemon stopped (pid {pid})" in stopped.stdout
    assert not home.socket.exists() and home.daemon_pid() is None
    assert not alive(pid)
    info = status(home)
    assert info["running"] is False and "no Kelpie daemon answers" in info["error"]
    assert "not running" in home.kelpie("daemon", "stop").stdout

    # SIGTERM shuts it down the same way
    assert home.kelpie("daemon", "start").returncode == 0
    pid = home.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 30, "the daemon to exit on SIGTERM")
    assert not home.socket.exists() and home.daemon_pid() is None


def test_second_daemon_on_the_same_state_fails(home: KelpieHome) -> None:
    assert home.kelpie("daemon", "start").returncode == 0
    pid = home.daemon_pid()
    # same state, own runtime dir: the data directory's lock says who owns it
    other_run = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))
    try:
        proc = subprocess.run(
            [*KELPIE, "daemon", "run"], env={**home.env,
                                                       "KELPIE_RUNTIME_DIR": str(other_run)},
            capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 125, proc.stderr
        assert f"is in use by another runtime (pid {pid})" in proc.stderr
        assert not (other_run / "kelpie.sock").exists()
    finally:
        shutil.rmtree(other_run, ignore_errors=True)
    # same state and runtime dir: refused the same way, and the first daemon is untouched
    proc = home.kelpie("daemon", "run", timeout=60)
    assert proc.returncode == 125 and f"(pid {pid})" in proc.stderr
    assert status(home)["pid"] == pid and home.socket.exists()


def test_autostart_after_a_crash_marks_mock_sandboxes_crashed(home: KelpieHome) -> None:
    made = home.kelpie("run", "-d", "--name", "kept")
    assert made.returncode == 0, made.stderr
    assert home.kelpie("run", "--name", "done", "--", "true").returncode == 0
    pid = home.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not answers(home.socket), 30, "the killed daemon to stop answering")
    assert home.socket.exists()  # left behind by the killed daemon

    listed = home.kelpie("ps", "-a", "--json")
    assert listed.returncode == 0, listed.stderr
    new_pid = home.daemon_pid()
    assert new_pid is not None and new_pid != pid
    sandboxes = {s["name"]: s for s in json.loads(listed.stdout)}
    assert sandboxes["kept"]["state"] == "crashed"
    assert sandboxes["kept"]["crash_reason"] == MOCK_GONE
    assert sandboxes["done"]["state"] == "stopped" and sandboxes["done"]["crash_reason"] is None
    events = json.loads(home.kelpie("inspect", "kept").stdout)[0]["events"]
    assert (events[-1]["state"], events[-1]["reason"]) == ("crashed", MOCK_GONE)
    # a crashed mock sandbox starts again with a fresh VM
    assert home.kelpie("start", "kept").returncode == 0
    assert json.loads(home.kelpie("inspect", "kept").stdout)[0]["state"] == "running"


def test_no_autostart_without_a_daemon(home: KelpieHome) -> None:
    proc = home.kelpie("--no-autostart", "ps")
    assert proc.returncode == 125
    assert "no Kelpie daemon answers" in proc.stderr and "kelpie daemon start" in proc.stderr
    assert home.daemon_pid() is None and not home.socket.exists()


# ==== 5. the OpenAPI document ==========================================================


def load_openapi_script() -> Any:
    spec = importlib.util.spec_from_file_location("kelpie_openapi_script",
                                                  ROOT / "scripts" / "openapi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openapi_document_is_current() -> None:
    generated = load_openapi_script().render()
    checked_in = (ROOT / "docs" / "openapi.json").read_text()
    assert generated == checked_in, (
        "docs/openapi.json is out of date with the daemon's routes and kelpie.api models; "
        "regenerate it with `python scripts/openapi.py` and check it in")


def test_app_is_built_without_opening_the_runtime(tmp_path: Path) -> None:
    runtime = mock_runtime(tmp_path)
    document = create_app(runtime).openapi()
    assert not (tmp_path / "data").exists()  # nothing opened, nothing locked
    paths = document["paths"]
    assert {"/v1/sandboxes", "/v1/sandboxes/{ref}", "/v1/sandboxes/{ref}/exec",
            "/v1/sandboxes/{ref}/files", "/v1/version"} <= set(paths)
    assert document["info"]["title"] == "Kelpie daemon"


def test_openapi_script_check_mode(tmp_path: Path) -> None:
    script = load_openapi_script()
    out = tmp_path / "openapi.json"
    assert script.main(["--output", str(out)]) == 0
    assert out.read_text() == script.render()
    assert script.main(["--output", str(out), "--check"]) == 0
    out.write_text("{}\n")
    assert script.main(["--output", str(out), "--check"]) == 1




# ==== 6. fuzzing every operation from the document =====================================

FUZZ_CONFIG = {
    "checks": {
        # Schema-valid input may still be refused by the runtime's own checks (400: a volume
        # whose host directory is missing, a port already used...), but never as malformed
        # (422: the document would be wrong) and never with a server error.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "409"]},
        # 504 is a command past its timeout (documented for exec only, which
        # status_code_conformance holds it to).
        "not_a_server_error": {"expected-statuses": ["2xx", "4xx", "504"]},
    },
}


@contextlib.asynccontextmanager
async def _fuzz_sandboxes(runtime: Runtime) -> AsyncIterator[None]:
    """The app's lifespan: the runtime open, with a running and a stopped sandbox."""
    async with runtime:
        if not await runtime.list_sandboxes(all=True):
            await runtime.create(name="alpha")
            await runtime.create(name="beta", command=["echo", "main"])
            await runtime.stop("beta")
        yield


def _heal(app: Any) -> None:
    """Bring the fuzz sandboxes back after a fuzzed call paused, stopped or removed them.

    Run after every fuzzed call, this also checks that the app still serves.
    """
    with st_asgi.get_client(app) as client:
        for name, body in (("alpha", {"name": "alpha"}), ("beta", {"name": "beta"})):
            reply = client.get(f"/v1/sandboxes/{name}")
            if reply.status_code == 404:
                reply = client.post("/v1/sandboxes", json=body)
            assert reply.status_code in (200, 201), reply.text
            state = reply.json()["state"]
            if name == "alpha" and state == "paused":
                assert client.post("/v1/sandboxes/alpha/resume").status_code == 200
            elif name == "alpha" and state != "running":
                assert client.post("/v1/sandboxes/alpha/start").status_code == 200


@pytest.fixture
def api_schema(tmp_path: Path) -> Iterator[Any]:
    """The document of an app over a mock runtime (opened in the app's lifespan, on the
    event loop schemathesis serves it from) holding a running and a stopped sandbox."""
    runtime = mock_runtime(tmp_path)
    app = create_app(runtime)
    app.router.lifespan_context = lambda _app: _fuzz_sandboxes(runtime)
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=schemathesis.Config.from_dict(FUZZ_CONFIG))

    @schema.hook
    def flatmap_path_parameters(context: Any, parameters: dict[str, Any] | None) -> Any:
        # aim most calls at sandboxes that exist; the rest get the generated reference
        if not parameters or "ref" not in parameters:
            return strategies.just(parameters)
        refs = strategies.sampled_from(["alpha", "alpha", "beta", parameters["ref"]])
        return refs.map(lambda ref: {**parameters, "ref": ref})

    try:
        yield schema
        # schemathesis ends the app's lifespan with the test; a new one re-opens the runtime
        # on the same data (alpha, a mock sandbox, comes back crashed and is started again)
        _heal(app)
        with st_asgi.get_client(app) as client:
            crashed = client.get("/v1/sandboxes/alpha/events").json()[-3]
            assert (crashed["state"], crashed["reason"]) == ("crashed", MOCK_GONE)
            assert client.get("/v1/version").json()["api_version"] == "v1"
            ran = client.post("/v1/sandboxes/alpha/exec", json={"argv": ["echo", "alive"]})
            assert ran.status_code == 200 and base64.b64decode(ran.json()["stdout"]) == b"alive\n"
            assert client.get("/v1/sandboxes", params={"all": True}).status_code == 200
    finally:
        st_asgi.shutdown_lifespans()  # closes the runtime


# Pulls and pushes reach out to registries on the network: they are tested against a real
# registry in tests/test_cli_image.py and tests/test_images_push.py instead; builds take a
# tar body (tests/test_build.py sends hostile ones).
fuzz_schema = schemathesis.pytest.from_fixture("api_schema").exclude(
    path=["/v1/image-pulls", "/v1/image-pushes", "/v1/builds"])


@fuzz_schema.parametrize()
@hypothesis.settings(max_examples=30, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz_every_operation(case: Any) -> None:
    if case.query:  # following logs, teleports or the fleet's view never ends
        case.query.pop("follow", None)
    excluded = []
    if case.operation.path == "/v1/events":  # a live stream: end it at once, after the backlog
        case.query = {**(case.query or {}), "until": 1.0}
        # ``until`` replaced may have been the one bad part of a negative case
        excluded.append(schemathesis.checks.negative_data_rejection)
    if case.operation.path == "/v1/dashboard/session":  # a well-formed token may be wrong
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.call_and_validate(timeout=30, excluded_checks=excluded)
    _heal(case.operation.app)


async def test_events_stream_every_sandbox_live_and_refuse_bad_filters(served: Served) -> None:
    client = served.client
    seen: list[Any] = []

    async def watch() -> None:
        async for event in client.watch_events(kinds=["state", "restarted", "removed"]):
            seen.append(event)

    watcher = asyncio.create_task(watch())
    await wait_until(lambda: served.runtime._feed._recorded is not None, 10,
                     "the watcher to wait for events")
    made = await client.create(SandboxCreate(name="ev", command=["false"],
                                             restart="on-failure:1"))
    assert (made.restart, made.stop_timeout) == ("on-failure:1", None)
    assert await client.wait_main("ev") == 1
    await client.remove("ev", force=True)
    await wait_until(lambda: any(e.kind == "removed" for e in seen), 10, "the removal")
    watcher.cancel()
    assert [(e.name, e.kind, e.state) for e in seen] == [
        ("ev", "state", "created"), ("ev", "state", "starting"), ("ev", "state", "running"),
        ("ev", "restarted", "running"), ("ev", "state", "stopped"),
        ("ev", "removed", "stopped")]
    assert {e.sandbox_id for e in seen} == {made.id}
    past = [e async for e in client.watch_events(since=0, until=time.time() - 3600)]
    assert past == []
    backlog = [e async for e in client.watch_events(since=0, until=time.time(),
                                                    sandboxes=["box"])]
    assert [e.state for e in backlog][:3] == ["created", "starting", "running"]
    with pytest.raises(ConfigError, match="event kind 'boom' is not known"):
        async for _ in client.watch_events(kinds=["boom"]):
            pass
