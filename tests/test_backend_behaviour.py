"""One behaviour suite for every registered VM backend.

Each test body runs once per backend in ``kelpie.vm.DEFAULT_REGISTRY``: a new backend joins
by registering (``backend_fixtures.py`` says how to build its VMs, if it needs more than
its spec). An operation a backend's :class:`~kelpie.vm.Capabilities` do not declare is not
skipped: the test asserts that it raises :class:`UnsupportedOperation` instead.

Whether a backend must run here is ``KELPIE_REQUIRE_BACKENDS``'s call (see
``backend_requirements.py``): a required one that cannot run fails, any other skips.
Tests of real backends carry the ``vm`` marker. The suite also runs a mock that declares no
optional capability (``SUITE_DOUBLES``), so its UnsupportedOperation checks run everywhere.

Booting costs seconds of CPU under QEMU TCG, so VMs are shared within this module, per
backend: ``vm`` (booted once) serves the tests that leave it running; ``spare`` serves,
one after the other, the tests that stop, crash or restore a VM, each bringing it to the
state it needs first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from backend_fixtures import SUITE_DOUBLES, BackendUnderTest, backend_under_test
from backend_requirements import require_backend
from kelpie.vm import (
    DEFAULT_REGISTRY,
    BackendSpec,
    ConfigError,
    ExecOutput,
    ExecProcess,
    ExecTimeout,
    GuestFileError,
    InvalidStateError,
    KelpieError,
    SnapshotKind,
    UnsupportedOperation,
    VmInstance,
    VmSnapshot,
    VmState,
)
from waiting import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONFIG_ENV = {"FROM_CONFIG": "yes"}
CRASH_NOTICE_SECONDS = 60
"""How long a backend may take to notice that its VM died (a bound, not a wait)."""


def _spec(name: str) -> BackendSpec:
    return SUITE_DOUBLES[name] if name in SUITE_DOUBLES else DEFAULT_REGISTRY.get(name)


def _backends() -> list[object]:
    return [
        pytest.param(name, id=name, marks=[pytest.mark.vm] if _spec(name).real else [])
        for name in [*DEFAULT_REGISTRY.names(), *SUITE_DOUBLES]
    ]


@pytest.fixture(scope="module", params=_backends())
def backend(request: pytest.FixtureRequest) -> Iterator[BackendUnderTest]:
    name: str = request.param
    if name not in SUITE_DOUBLES:
        require_backend(name)
    where = Path(f"/tmp/kelpie-suite-{name}-{os.getpid()}")  # short: unix sockets live here
    where.mkdir(exist_ok=True)
    try:
        yield backend_under_test(_spec(name), request, where)
    finally:
        subprocess.run(["rm", "-rf", str(where)], check=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(backend: BackendUnderTest) -> AsyncIterator[VmInstance]:
    """The backend's shared running VM: tests leave it running."""
    machine = backend.new_vm(env=CONFIG_ENV)
    await machine.start()
    yield machine
    await machine.stop(force=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def spare(backend: BackendUnderTest) -> AsyncIterator[VmInstance]:
    """A second VM of the backend for tests that stop, crash or restore one (unstarted)."""
    machine = backend.new_vm(env=CONFIG_ENV)
    yield machine
    await machine.stop(force=True)


async def running(machine: VmInstance) -> VmInstance:
    """``machine``, started if it is not running."""
    if machine.state is not VmState.RUNNING:
        await machine.stop(force=True)
        await machine.start()
    return machine


async def stopped(machine: VmInstance) -> VmInstance:
    """``machine``, shut down (gracefully, so its disk is complete) if it ran."""
    await machine.stop()
    return machine


async def first_output(process: ExecProcess) -> bytes:
    async for event in process:
        if isinstance(event, ExecOutput):
            return event.data
    raise AssertionError(f"{process.request.argv} ended before printing anything")


def assert_unsupported(info: pytest.ExceptionInfo[UnsupportedOperation],
                       backend: BackendUnderTest, capability: str) -> None:
    assert info.value.backend == backend.name
    assert set(info.value.supported_by) == set(DEFAULT_REGISTRY.with_capability(capability))


# ---- boot and the state machine ---------------------------------------------------------
async def test_boot(vm: VmInstance, backend: BackendUnderTest) -> None:
    assert vm.state is VmState.RUNNING and vm.crash_reason is None
    assert vm.backend_name == backend.name
    assert vm.transitions[:2] == [(VmState.CREATED, VmState.STARTING),
                                  (VmState.STARTING, VmState.RUNNING)]
    result = await vm.exec(["echo", "hello"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"hello\n", b"")
    named = await vm.exec(["hostname"])  # no hostname configured: one from the VM's id
    assert named.stdout == f"kelpie-{vm.id[:8]}\n".encode()


async def test_an_unstarted_vm_refuses_guest_operations(backend: BackendUnderTest,
                                                        tmp_path: Path) -> None:
    fresh = backend.new_vm()
    calls = {
        "exec": fresh.exec(["true"]),
        "read a file": fresh.read_file("/etc/hostname"),
        "write a file": fresh.write_file("/tmp/x", b"x"),
        "list a directory": fresh.list_dir("/"),
        "make a directory": fresh.mkdir("/tmp/d"),
        "remove a file": fresh.remove("/tmp/x"),
        "pause": fresh.pause(),
        "resume": fresh.resume(),
        "snapshot": fresh.snapshot(tmp_path / "never"),
    }
    for what, call in calls.items():
        with pytest.raises(InvalidStateError) as info:
            await call
        assert info.value.current is VmState.CREATED, what
        assert VmState.CREATED not in info.value.allowed, what
    assert fresh.state is VmState.CREATED
    await fresh.stop()  # stopping a VM that never ran is allowed, and releases nothing
    assert fresh.state is VmState.STOPPED
    with pytest.raises(InvalidStateError):
        await fresh.exec(["true"])
    assert not (tmp_path / "never").exists()


async def test_a_running_vm_refuses_start_and_resume(vm: VmInstance) -> None:
    with pytest.raises(InvalidStateError, match="allowed when created, stopped"):
        await vm.start()
    with pytest.raises(InvalidStateError):
        await vm.resume()
    assert vm.state is VmState.RUNNING


# ---- exec -------------------------------------------------------------------------------
async def test_exit_code_and_stderr(vm: VmInstance) -> None:
    result = await vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert not result.ok and result.signal is None
    missing = await vm.exec(["no-such-program"])
    assert missing.exit_code == 127 and b"no-such-program" in missing.stderr


async def test_env_and_cwd(vm: VmInstance) -> None:
    result = await vm.exec(["env"], env={"EXTRA": "x y"})
    lines = result.stdout.decode().splitlines()
    assert "FROM_CONFIG=yes" in lines and "EXTRA=x y" in lines  # the VM's env, and the call's
    overridden = await vm.exec(["env"], env={"FROM_CONFIG": "from the call"})
    assert "FROM_CONFIG=from the call" in overridden.stdout.decode().splitlines()
    where = await vm.exec(["sh", "-c", "pwd"], cwd="/tmp")
    assert where.stdout == b"/tmp\n"


async def test_bad_exec_requests_are_refused_before_the_guest(vm: VmInstance) -> None:
    for argv, kwargs in (([], {}), (["true"], {"cwd": "tmp"}), (["true"], {"timeout": 0}),
                         (["true"], {"env": {"A=B": "x"}}), (["a\0b"], {})):
        with pytest.raises(ConfigError):
            await vm.exec(argv, **kwargs)  # type: ignore[arg-type]
    assert (await vm.exec(["true"])).ok


async def test_stdin(vm: VmInstance) -> None:
    result = await vm.exec(["cat"], stdin=b"piped text\n")
    assert result.stdout == b"piped text\n"
    async with vm.exec_stream(["cat"]) as process:
        await process.write_stdin(b"one ")
        await process.write_stdin(b"two\n")
        await process.close_stdin()
        streamed = await process.wait()
    assert (streamed.exit_code, streamed.stdout) == (0, b"one two\n")


async def test_large_output_arrives_intact(vm: VmInstance) -> None:
    data = os.urandom(4 * 1024 * 1024)
    await vm.write_file("/tmp/suite-big", data)
    result = await vm.exec(["cat", "/tmp/suite-big"])
    assert result.exit_code == 0 and result.stdout == data
    await vm.remove("/tmp/suite-big")


async def test_timeout_kills_the_command_and_keeps_its_output(vm: VmInstance) -> None:
    with pytest.raises(ExecTimeout) as info:
        await vm.exec(["sh", "-c", "echo started; sleep 100"], timeout=2.0)
    assert info.value.stdout == b"started\n" and info.value.timeout == 2.0
    assert (await vm.exec(["echo", "after"])).stdout == b"after\n"


async def test_concurrent_execs(vm: VmInstance) -> None:
    results = await asyncio.gather(
        *(vm.exec(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(16))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(16)]


async def test_signal_ends_a_running_command(vm: VmInstance) -> None:
    async with vm.exec_stream(["sh", "-c", "echo ready; sleep 100"]) as process:
        assert await first_output(process) == b"ready\n"
        await process.send_signal(signal.SIGTERM)
        result = await process.wait()
    assert result.signal == signal.SIGTERM and result.exit_code == 128 + signal.SIGTERM


async def test_pty(vm: VmInstance, backend: BackendUnderTest) -> None:
    if not backend.capabilities.pty:
        with pytest.raises(UnsupportedOperation) as info:
            async with vm.exec_stream(["sh"], pty=True):
                pass
        assert_unsupported(info, backend, "pty")
        return
    async with vm.exec_stream(["sh", "-c", "tty; read go; stty size"], pty=True) as process:
        await process.resize(30, 100)
        await process.write_stdin(b"go\n")
        result = await process.wait()
    output = result.stdout.replace(b"\r\n", b"\n")
    assert result.exit_code == 0
    assert b"/dev/pts/" in output and b"30 100\n" in output


# ---- files ------------------------------------------------------------------------------
async def test_files(vm: VmInstance) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    await vm.mkdir("/tmp/suite/nested/deeper", mode=0o700)
    await vm.mkdir("/tmp/suite/nested/deeper", mode=0o700)  # an existing one is fine
    await vm.write_file("/tmp/suite/upload", data, mode=0o640)
    assert await vm.read_file("/tmp/suite/upload") == data
    assert b"".join([c async for c in vm.read_file_stream("/tmp/suite/upload")]) == data

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"part {i}\n".encode()

    await vm.write_file("/tmp/suite/streamed", chunks())
    assert await vm.read_file("/tmp/suite/streamed") == b"part 0\npart 1\npart 2\n"

    entries = {e.name: e for e in await vm.list_dir("/tmp/suite")}
    assert sorted(entries) == ["nested", "streamed", "upload"]
    assert (entries["upload"].type, entries["upload"].size, entries["upload"].mode) == (
        "file", len(data), 0o640)
    assert entries["nested"].type == "dir"
    [deeper] = await vm.list_dir("/tmp/suite/nested")
    assert (deeper.name, deeper.type, deeper.mode) == ("deeper", "dir", 0o700)

    with pytest.raises(GuestFileError) as info:
        await vm.remove("/tmp/suite/nested")
    assert info.value.code == "ENOTEMPTY"
    await vm.remove("/tmp/suite/nested", recursive=True)
    await vm.remove("/tmp/suite/upload")
    assert [e.name for e in await vm.list_dir("/tmp/suite")] == ["streamed"]
    for call, code in ((vm.read_file("/tmp/suite/upload"), "ENOENT"),
                       (vm.list_dir("/tmp/suite/nested"), "ENOENT"),
                       (vm.read_file("/tmp/suite"), "EISDIR")):
        with pytest.raises(GuestFileError) as info:
            await call
        assert info.value.code == code
    with pytest.raises(ConfigError):
        await vm.read_file("relative/path")
    await vm.remove("/tmp/suite", recursive=True)


# ---- pause and resume -------------------------------------------------------------------
async def test_pause_stops_the_guest_and_resume_continues(vm: VmInstance,
                                                          backend: BackendUnderTest) -> None:
    if not backend.capabilities.pause:
        with pytest.raises(UnsupportedOperation) as info:
            await vm.pause()
        assert_unsupported(info, backend, "pause")
        assert vm.state is VmState.RUNNING
        return
    woke = asyncio.Event()

    async def watch(process: ExecProcess) -> None:
        if await first_output(process) == b"woke\n":
            woke.set()

    async with vm.exec_stream(["sh", "-c", "sleep 0.5; echo woke"]) as process:
        watcher = asyncio.create_task(watch(process))
        await vm.pause()
        assert vm.state is VmState.PAUSED
        for refused in (vm.exec(["true"]), vm.read_file("/etc/hostname"), vm.pause()):
            with pytest.raises(InvalidStateError):
                await refused
        # Time passes while the guest is paused (the sleep IS the test): a running guest
        # would print within 0.5 s, a paused one must not print at all.
        waiter = asyncio.ensure_future(woke.wait())
        done, _ = await asyncio.wait([waiter], timeout=1.5)
        assert not done, "the paused guest's command went on running"
        await vm.resume()
        assert vm.state is VmState.RUNNING
        await asyncio.wait_for(waiter, 30)
        await watcher
        assert (await process.wait()).exit_code == 0


# ---- crash detection --------------------------------------------------------------------
async def test_a_vm_that_dies_is_marked_crashed(spare: VmInstance,
                                                backend: BackendUnderTest) -> None:
    if backend.kill is None:
        pytest.skip(f"backend_fixtures.py does not say how to kill a {backend.name} VM")
    machine = await running(spare)
    async with machine.exec_stream(["sh", "-c", "echo ready; sleep 100"]) as process:
        assert await first_output(process) == b"ready\n"
        expected = await backend.kill(machine)
        await wait_until(lambda: machine.state is VmState.CRASHED, CRASH_NOTICE_SECONDS,
                         f"the {backend.name} VM to be marked crashed after its death")
        with pytest.raises(KelpieError):  # the command in flight ends with an error
            await process.wait()
    assert machine.crash_reason is not None and expected in machine.crash_reason
    for refused in (machine.exec(["true"]), machine.read_file("/etc/hostname")):
        with pytest.raises(InvalidStateError):
            await refused
    await machine.stop()
    assert machine.state is VmState.STOPPED


# ---- snapshots --------------------------------------------------------------------------
async def test_disk_snapshot_of_a_stopped_vm_restores_its_disk(
    vm: VmInstance, spare: VmInstance, backend: BackendUnderTest, tmp_path: Path
) -> None:
    if SnapshotKind.DISK not in backend.capabilities.snapshot_kinds:
        with pytest.raises(UnsupportedOperation) as info:
            await vm.snapshot(tmp_path / "disk", kind=SnapshotKind.DISK)
        assert_unsupported(info, backend, "snapshot:disk")
        return
    with pytest.raises(InvalidStateError, match="disk snapshot"):  # only of a stopped VM
        await vm.snapshot(tmp_path / "refused", kind=SnapshotKind.DISK)
    machine = await running(spare)
    await machine.write_file("/root/suite-disk", b"on the disk\n")
    await stopped(machine)
    if SnapshotKind.FULL in backend.capabilities.snapshot_kinds:
        with pytest.raises(InvalidStateError, match="full snapshot"):  # nothing in memory
            await machine.snapshot(tmp_path / "refused", kind=SnapshotKind.FULL)
    snapshot = await machine.snapshot(tmp_path / "disk", kind=SnapshotKind.DISK)
    assert snapshot.manifest.kind is SnapshotKind.DISK
    assert snapshot.manifest.backend == backend.name
    assert machine.state is VmState.STOPPED
    await machine.restore(VmSnapshot.open(snapshot.path))
    assert machine.state is VmState.RUNNING
    assert await machine.read_file("/root/suite-disk") == b"on the disk\n"
    assert not (tmp_path / "refused").exists()


async def test_full_snapshot_restores_memory_and_disk_as_they_were(
    vm: VmInstance, spare: VmInstance, backend: BackendUnderTest, tmp_path: Path
) -> None:
    if SnapshotKind.FULL not in backend.capabilities.snapshot_kinds:
        with pytest.raises(UnsupportedOperation) as info:
            await vm.snapshot(tmp_path / "full", kind=SnapshotKind.FULL)
        assert_unsupported(info, backend, "snapshot:full")
        assert vm.state is VmState.RUNNING
        return
    await vm.write_file("/root/suite-before", b"kept\n")
    snapshot = await vm.snapshot(tmp_path / "full")
    assert vm.state is VmState.RUNNING  # paused while it was taken, then resumed
    assert snapshot.manifest.kind is SnapshotKind.FULL
    assert snapshot.manifest.backend == backend.name
    snapshot.verify()
    await vm.write_file("/root/suite-after", b"lost\n")  # after the snapshot: not in it

    target = await stopped(spare)
    with pytest.raises(InvalidStateError):  # a running VM cannot be restored over
        await vm.restore(VmSnapshot.open(snapshot.path))
    await target.restore(VmSnapshot.open(snapshot.path), paused=True)
    assert target.state is VmState.PAUSED
    await target.resume()
    assert await target.read_file("/root/suite-before") == b"kept\n"
    with pytest.raises(GuestFileError) as info:
        await target.read_file("/root/suite-after")
    assert info.value.code == "ENOENT"
    assert (await target.exec(["echo", "restored"])).stdout == b"restored\n"
    await vm.remove("/root/suite-before")
    await vm.remove("/root/suite-after")


async def test_snapshot_left_paused(vm: VmInstance, backend: BackendUnderTest,
                                    tmp_path: Path) -> None:
    if SnapshotKind.FULL not in backend.capabilities.snapshot_kinds:
        with pytest.raises(UnsupportedOperation):
            await vm.snapshot(tmp_path / "full", leave_paused=True)
        assert vm.state is VmState.RUNNING
        return
    await vm.snapshot(tmp_path / "full", leave_paused=True)
    assert vm.state is VmState.PAUSED
    await vm.resume()
    assert (await vm.exec(["echo", "resumed"])).stdout == b"resumed\n"


# ---- checkpoints ------------------------------------------------------------------------
SCRIPT = b"#!/bin/sh\necho ran from the workspace\n"
DATA = bytes(range(256)) * 300  # 75 KiB: more than one transfer chunk


async def test_checkpoint_of_a_running_vm_restores_its_workspace(
    vm: VmInstance, spare: VmInstance, backend: BackendUnderTest, tmp_path: Path
) -> None:
    if SnapshotKind.CHECKPOINT not in backend.capabilities.snapshot_kinds:
        with pytest.raises(UnsupportedOperation) as info:
            await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
        assert_unsupported(info, backend, "snapshot:checkpoint")
        return
    await vm.mkdir("/workspace/suite/deep", mode=0o750)
    await vm.write_file("/workspace/suite/run.sh", SCRIPT, mode=0o755)
    await vm.write_file("/workspace/suite/deep/data.bin", DATA)
    snapshot = await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    assert vm.state is VmState.RUNNING  # taken from the running guest
    assert snapshot.manifest.kind is SnapshotKind.CHECKPOINT
    await vm.remove("/workspace/suite", recursive=True)

    target = await stopped(spare)
    await target.restore(VmSnapshot.open(snapshot.path))
    assert target.state is VmState.RUNNING
    assert await target.read_file("/workspace/suite/run.sh") == SCRIPT
    assert await target.read_file("/workspace/suite/deep/data.bin") == DATA
    modes = {e.name: (e.type, e.mode) for e in await target.list_dir("/workspace/suite")}
    assert modes == {"run.sh": ("file", 0o755), "deep": ("dir", 0o750)}
