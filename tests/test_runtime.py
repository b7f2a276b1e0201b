"""The runtime on the mock backend: records, lookups, lifecycle, failures, restarts, schema.

Backends are injected through a registry (the real mock spec, plus test specs whose VMs
"survive" in a dict, or whose start fails), never by monkeypatching.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from fixtures.images.tarbuild import file
from kelpie.backends import MOCK
from kelpie.backends.mock import MockVm
from kelpie.images import ImageStore
from kelpie.runtime import (
    SCHEMA_VERSION,
    AmbiguousSandbox,
    EventKind,
    Runtime,
    RuntimeLocked,
    RuntimeNotOpen,
    SandboxInfo,
    SandboxNameInUse,
    SandboxNotFound,
    SandboxStateError,
    StateDatabaseError,
    base_disk_mib,
    generated_name,
)
from kelpie.runtime._db import DB_FILENAME, StateDb, migrate, schema_version
from kelpie.sim import Fault, FaultInjector, FaultSpec, SimRng
from kelpie.vm import (
    DEFAULT_DISK_MIB,
    BackendRegistry,
    BackendSpec,
    BootError,
    ConfigError,
    KelpieError,
    LocalStorage,
    SnapshotKind,
    StorageError,
    VmConfig,
    VmFactory,
    VmInstance,
    VmState,
)
from test_images_store import put_image
from waiting import wait_until

MOCK_GONE = "backend 'mock' VMs do not survive a restart"


class Ids:
    """A deterministic id source: fixed prefixes, then a counter."""

    def __init__(self, *ids: str) -> None:
        self._given = list(ids)
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        if self._given:
            return self._given.pop(0)
        return f"{next(self._counter):012x}"


class DurableBackend:
    """A backend whose VMs outlive the runtime (kept in a dict, like detached processes)."""

    def __init__(self) -> None:
        self.vms: dict[str, VmInstance] = {}

    def create(self, config: VmConfig, **options: Any) -> VmInstance:
        vm = MockVm(config, **options)
        self.vms[vm.id] = vm
        return vm

    async def attach(self, vm_id: str) -> VmInstance:
        try:
            return self.vms[vm_id]
        except KeyError:
            raise BootError(f"VM {vm_id} is gone (no process)") from None

    def spec(self) -> BackendSpec:
        return BackendSpec(
            name="durable", description="mock VMs that survive restarts",
            capabilities=MockVm.capabilities, probe=MOCK.probe, create=self.create,
            real=False, attach=self.attach,
        )


@pytest.fixture
def durable() -> DurableBackend:
    return DurableBackend()


@pytest.fixture
def registry(durable: DurableBackend) -> BackendRegistry:
    registry = BackendRegistry()
    registry.register(MOCK)
    registry.register(durable.spec())
    return registry


@pytest.fixture
def make_runtime(tmp_path: Path, registry: BackendRegistry) -> Callable[..., Runtime]:
    def make(**kw: Any) -> Runtime:
        kw.setdefault("data_dir", tmp_path / "data")
        kw.setdefault("factory", VmFactory(registry, environ={}))
        kw.setdefault("images", ImageStore(tmp_path / "images"))
        kw.setdefault("clock", itertools.count(1_000).__next__)
        return Runtime(**kw)

    return make


@pytest.fixture
async def runtime(make_runtime: Callable[..., Runtime]) -> AsyncIterator[Runtime]:
    async with make_runtime(new_id=Ids("abc111000000", "abc222000000")) as rt:
        yield rt


# -- create, list, get ------------------------------------------------------------------


async def test_create_records_and_starts(runtime: Runtime) -> None:
    info = await runtime.create(name="web", backend="mock", cpus=1, memory_mib=256,
                                env={"A": "1"}, labels={"team": "x"})
    assert info.state is VmState.RUNNING
    assert (info.name, info.backend, info.id) == ("web", "mock", "abc111000000")
    assert (info.config.vcpus, info.config.memory_mib, dict(info.config.env)) == (1, 256,
                                                                                  {"A": "1"})
    assert info.labels == {"team": "x"} and info.last_error is None
    assert [e.state for e in (await runtime.events("web"))] == [
        VmState.CREATED, VmState.STARTING, VmState.RUNNING]


async def test_get_by_name_id_and_prefix(runtime: Runtime) -> None:
    one = await runtime.create(name="one", backend="mock")
    two = await runtime.create(backend="mock")
    assert two.name == generated_name(two.id)
    assert (await runtime.inspect("one")) == one
    assert (await runtime.inspect(two.id)).id == two.id
    assert (await runtime.inspect("abc2")).id == two.id
    assert (await runtime.inspect(two.name)).id == two.id
    with pytest.raises(AmbiguousSandbox) as ambiguous:
        await runtime.inspect("abc")
    assert "one" in str(ambiguous.value) and two.name in str(ambiguous.value)
    with pytest.raises(SandboxNotFound, match="too short"):
        await runtime.inspect("ab")
    with pytest.raises(SandboxNotFound, match="unique id prefix"):
        await runtime.inspect("fff")
    assert isinstance(ambiguous.value, KelpieError)


async def test_list_hides_sandboxes_at_rest_unless_all(runtime: Runtime) -> None:
    await runtime.create(name="a", backend="mock")
    await runtime.create(name="b", backend="mock")
    await runtime.stop("b")
    assert [i.name for i in (await runtime.list_sandboxes())] == ["a"]
    assert [i.name for i in (await runtime.list_sandboxes(all=True))] == ["a", "b"]


@pytest.mark.parametrize("bad", ["", "-x", "a b", "x" * 64, "ünï", "a/b"])
async def test_bad_names_are_refused_before_anything_exists(runtime: Runtime, bad: str) -> None:
    with pytest.raises(ConfigError, match="sandbox name"):
        await runtime.create(name=bad, backend="mock")
    assert (await runtime.list_sandboxes(all=True)) == []


async def test_bad_config_is_refused_before_anything_exists(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match="vcpus"):
        await runtime.create(name="x", backend="mock", cpus=0)
    with pytest.raises(ConfigError, match="allowed: none, nat"):
        await runtime.create(name="x", backend="mock", network="bridge")
    with pytest.raises(ConfigError, match="HOST:GUEST"):
        await runtime.create(name="x", backend="mock", volumes=["nocolon"])
    with pytest.raises(KelpieError, match="unknown backend 'nope'"):
        await runtime.create(name="x", backend="nope")
    assert (await runtime.list_sandboxes(all=True)) == []


async def test_name_clash_refused_and_nothing_half_created(runtime: Runtime) -> None:
    first = await runtime.create(name="dup", backend="mock")
    with pytest.raises(SandboxNameInUse, match=f"'dup' is already in use \\(sandbox {first.id}"):
        await runtime.create(name="dup", backend="mock")
    assert [i.id for i in (await runtime.list_sandboxes(all=True))] == [first.id]


@pytest.mark.parametrize("with_image", [False, True])
async def test_concurrent_creates_with_one_name_only_one_wins(
    runtime: Runtime, with_image: bool,
) -> None:
    """With an image, every create passes the name pre-check while the rootfs is built in a
    thread, so the database's UNIQUE constraint is what decides."""
    image = None
    if with_image:
        put_image(runtime.images, [[file("a", "x")]], tag="example.com/race:1")
        image = "example.com/race:1"
    results = await asyncio.gather(
        *(runtime.create(name="race", backend="mock", image=image) for _ in range(5)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, SandboxInfo)]
    losers = [r for r in results if isinstance(r, SandboxNameInUse)]
    assert len(winners) == 1 and len(losers) == 4, results
    assert [i.name for i in (await runtime.list_sandboxes(all=True))] == ["race"]
    if with_image:
        assert runtime.images.holders(winners[0].image_digest or "") == (
            f"sandbox:{winners[0].id}",)


async def test_name_clash_between_two_databases_handles_is_caught_by_the_db(
    tmp_path: Path,
) -> None:
    """The UNIQUE constraint, not the pre-check, is what decides a race."""
    db = StateDb(tmp_path / DB_FILENAME)
    info = SandboxInfo(id="aaa000", name="n", backend="mock", state=VmState.CREATED,
                       config=VmConfig())
    db.insert(info)
    with pytest.raises(SandboxNameInUse):
        db.insert(SandboxInfo(id="bbb000", name="n", backend="mock", state=VmState.CREATED,
                              config=VmConfig()))
    assert [i.id for i in db.all()] == ["aaa000"]
    db.close()


# -- exec and files ---------------------------------------------------------------------


async def test_exec_and_files(runtime: Runtime) -> None:
    await runtime.create(name="box", backend="mock", env={"GREETING": "hi"})
    result = await runtime.exec("box", ["env"], env={"X": "there"})
    assert result.exit_code == 0
    assert b"GREETING=hi\n" in result.stdout and b"X=there\n" in result.stdout
    await runtime.write_file("box", "/tmp/f.txt", b"data")
    assert await runtime.read_file("box", "/tmp/f.txt") == b"data"
    assert "f.txt" in [e.name for e in await runtime.list_dir("box", "/tmp")]
    await runtime.remove_path("box", "/tmp/f.txt")
    assert "f.txt" not in [e.name for e in await runtime.list_dir("box", "/tmp")]
    async with runtime.exec_stream("box", ["cat"]) as process:
        await process.write_stdin(b"streamed")
        await process.close_stdin()
        assert (await process.wait()).stdout == b"streamed"


async def test_exec_in_a_stopped_sandbox_says_what_to_do(runtime: Runtime) -> None:
    await runtime.create(name="box", backend="mock")
    await runtime.stop("box")
    with pytest.raises(KelpieError, match="exec is allowed when running"):
        await runtime.exec("box", ["true"])


# -- lifecycle --------------------------------------------------------------------------


async def test_pause_resume_stop_start_remove(runtime: Runtime) -> None:
    await runtime.create(name="box", backend="mock")
    assert (await runtime.pause("box")).state is VmState.PAUSED
    assert (await runtime.resume("box")).state is VmState.RUNNING
    assert (await runtime.stop("box")).state is VmState.STOPPED
    assert (await runtime.stop("box")).state is VmState.STOPPED  # no-op at rest
    assert (await runtime.start("box")).state is VmState.RUNNING
    assert (await runtime.exec("box", ["echo", "again"])).stdout == b"again\n"
    with pytest.raises(SandboxStateError, match="running; remove is allowed when it is stopped"):
        await runtime.remove("box")
    assert (await runtime.inspect("box")).state is VmState.RUNNING
    await runtime.remove("box", force=True)
    assert (await runtime.list_sandboxes(all=True)) == []
    with pytest.raises(SandboxNotFound):
        await runtime.inspect("box")


async def test_start_of_a_running_sandbox_is_refused(runtime: Runtime) -> None:
    await runtime.create(name="box", backend="mock")
    with pytest.raises(SandboxStateError, match="start is allowed when it is created, stopped"):
        await runtime.start("box")


async def test_failing_start_keeps_the_record(make_runtime: Callable[..., Runtime]) -> None:
    faults = FaultInjector(SimRng(1), [FaultSpec(Fault.BOOT_FAIL, 1.0, max_times=1)])
    async with make_runtime(backend_options={"mock": {"faults": faults}}) as rt:
        with pytest.raises(BootError, match="injected boot_fail"):
            await rt.create(name="flaky", backend="mock")
        info = await rt.inspect("flaky")
        assert info.state is VmState.STOPPED
        assert info.last_error is not None and "injected boot_fail" in info.last_error
        started = await rt.start("flaky")  # the fault fired once; now it boots
        assert started.state is VmState.RUNNING and started.last_error is None


async def test_failing_create_keeps_the_record(
    make_runtime: Callable[..., Runtime], registry: BackendRegistry,
) -> None:
    def broken(config: VmConfig, **options: Any) -> VmInstance:
        raise OSError("no space left on device")

    registry.register(BackendSpec(name="broken", description="", capabilities=MOCK.capabilities,
                                  probe=MOCK.probe, create=broken, real=False))
    async with make_runtime() as rt:
        with pytest.raises(OSError, match="no space"):
            await rt.create(name="b", backend="broken")
        info = await rt.inspect("b")
        assert info.state is VmState.STOPPED
        assert info.last_error == "create failed: no space left on device"
        await rt.remove("b")


# -- restarts ---------------------------------------------------------------------------


async def test_restart_keeps_every_record_and_marks_mock_crashed(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        running = await rt.create(name="running", backend="mock")
        paused = await rt.create(name="paused", backend="mock")
        await rt.pause("paused")
        await rt.create(name="stopped", backend="mock")
        stopped = await rt.stop("stopped")
        later = await rt.create(name="later", backend="mock", start=False)
        assert later.state is VmState.CREATED
    async with make_runtime() as rt:
        by_name = {i.name: i for i in (await rt.list_sandboxes(all=True))}
        assert set(by_name) == {"running", "paused", "stopped", "later"}
        assert by_name["later"].state is VmState.CREATED  # never started: nothing crashed
        assert (await rt.start("later")).state is VmState.RUNNING
        for info in (running, paused):
            again = by_name[info.name]
            assert again.state is VmState.CRASHED and again.crash_reason == MOCK_GONE
            assert again.config == info.config and again.created_at == info.created_at
        assert by_name["stopped"].state is VmState.STOPPED == stopped.state
        with pytest.raises(SandboxStateError, match="start it first"):
            await rt.exec("running", ["true"])
        assert (await rt.start("running")).state is VmState.RUNNING  # a fresh VM
        await rt.remove("paused")


async def test_restart_reattaches_surviving_vms(
    make_runtime: Callable[..., Runtime], durable: DurableBackend,
) -> None:
    async with make_runtime() as rt:
        await rt.create(name="alive", backend="durable")
        await rt.write_file("alive", "/state", b"kept")
        gone = await rt.create(name="gone", backend="durable")
    del durable.vms[gone.id]  # its process died while no runtime was watching
    async with make_runtime() as rt:
        assert (await rt.inspect("alive")).state is VmState.RUNNING
        assert await rt.read_file("alive", "/state") == b"kept"
        lost = await rt.inspect("gone")
        assert lost.state is VmState.CRASHED
        assert lost.crash_reason is not None and "is gone (no process)" in lost.crash_reason
        # state changes of a re-attached VM are still recorded
        durable.vms[(await rt.inspect("alive")).id].mark_crashed("guest kernel panic")
        assert (await rt.inspect("alive")).crash_reason == "guest kernel panic"


async def test_closing_leaves_vms_running(
    make_runtime: Callable[..., Runtime], durable: DurableBackend,
) -> None:
    async with make_runtime() as rt:
        info = await rt.create(name="keep", backend="durable")
    assert durable.vms[info.id].state is VmState.RUNNING
    with pytest.raises(RuntimeNotOpen, match="async with Runtime"):
        await rt.list_sandboxes()


async def test_one_runtime_per_data_dir(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime():
        with pytest.raises(RuntimeLocked, match=r"in use by another runtime \(pid \d+\)"):
            await make_runtime().open()
    async with make_runtime() as rt:  # released on close
        assert (await rt.list_sandboxes()) == []


async def test_crash_observed_while_running_is_recorded(runtime: Runtime) -> None:
    info = await runtime.create(name="box", backend="mock")
    runtime._vms[info.id].mark_crashed("killed by the OOM killer")
    crashed = await runtime.inspect("box")
    assert crashed.state is VmState.CRASHED and crashed.crash_reason == "killed by the OOM killer"
    assert (await runtime.start("box")).state is VmState.RUNNING
    assert (await runtime.inspect("box")).crash_reason is None


# -- images -----------------------------------------------------------------------------


async def test_image_is_held_while_the_sandbox_exists(runtime: Runtime) -> None:
    image = put_image(runtime.images, [[file("etc/motd", "hello")]], tag="example.com/app:1",
                      runtime={"Env": ["FROM_IMAGE=yes"], "WorkingDir": "/srv", "User": "app:grp"})
    info = await runtime.create(image="example.com/app:1", name="img", backend="mock")
    assert info.image_digest == image.digest
    assert info.image == f"example.com/app@{image.digest}"
    assert info.config.root_disk is not None and info.config.root_disk.is_file()
    assert dict(info.config.env) == {"FROM_IMAGE": "yes"}
    assert (info.workdir, info.user) == ("/srv", "app")
    assert runtime.images.holders(image.digest) == (f"sandbox:{info.id}",)
    await runtime.remove("img", force=True)
    assert runtime.images.holders(image.digest) == ()


async def test_root_disk_size_defaults_to_10_gib_and_is_checked(runtime: Runtime) -> None:
    put_image(runtime.images, [[file("etc/motd", "hello")]], tag="example.com/app:1")
    info = await runtime.create(image="example.com/app:1", name="big", backend="mock")
    assert info.config.disk_mib == DEFAULT_DISK_MIB == 10240
    assert info.config.root_disk is not None
    assert info.config.root_disk.stat().st_size == 10240 << 20
    sized = await runtime.create(image="example.com/app:1", name="two", backend="mock",
                                 disk_mib=2048)
    assert sized.config.root_disk is not None
    assert sized.config.root_disk.stat().st_size == 2048 << 20
    with pytest.raises(ConfigError, match="no root disk to size"):
        await runtime.create(name="bare", backend="mock", disk_mib=2048)
    with pytest.raises(ConfigError, match="disk_mib is 1; allowed range is 64"):
        await runtime.create(image="example.com/app:1", backend="mock", disk_mib=1)
    assert {s.name for s in await runtime.list_sandboxes(all=True)} == {"big", "two"}


async def test_forks_and_template_sandboxes_grow_their_disk_never_shrink_it(
    runtime: Runtime,
) -> None:
    put_image(runtime.images, [[file("etc/motd", "hello")]], tag="example.com/app:1")
    parent = await runtime.create(image="example.com/app:1", name="p", backend="mock",
                                  disk_mib=1024)
    (child,) = await runtime.fork("p", 1, disk_mib=4096)
    assert child.config.disk_mib == 4096 and child.state is VmState.RUNNING
    assert runtime._vms[child.id].config.disk_mib == 4096
    assert (await runtime.stats(child.id)).disk_limit_bytes == 4096 << 20
    # its base disk stays the parent's: a teleport builds the base at that size
    assert runtime.moves.record(child.id)["base_disk_mib"] == 1024
    assert base_disk_mib(runtime.moves.record(child.id)) == 1024
    assert base_disk_mib(runtime.moves.record(parent.id)) == 1024
    with pytest.raises(ConfigError, match=r"smaller than the 1024 MiB disk of p \("):
        await runtime.fork("p", 1, name_prefix="q", disk_mib=512)
    with pytest.raises(ConfigError, match="disk_mib is 99999999"):
        await runtime.fork("p", 1, name_prefix="q", disk_mib=99_999_999)
    await runtime.create(name="bare", backend="mock")
    with pytest.raises(ConfigError, match="no root disk to grow"):
        await runtime.fork("bare", 1, disk_mib=4096)

    await runtime.create_template(name="t", image="example.com/app:1", backend="mock",
                                  disk_mib=1024)
    grown = await runtime.create(template="t", name="from-t", disk_mib=2048)
    assert grown.config.disk_mib == 2048 and grown.state is VmState.RUNNING
    with pytest.raises(ConfigError, match="smaller than the 1024 MiB disk"):
        await runtime.create(template="t", name="small", disk_mib=100)
    with pytest.raises(ConfigError, match="cpus cannot be given with a template"):
        await runtime.create(template="t", name="cpus", cpus=2)
    names = {s.name for s in await runtime.list_sandboxes(all=True)}
    assert names == {"p", "p-1", "bare", "from-t"}  # nothing half made by a refusal


# -- logs -------------------------------------------------------------------------------


async def test_logs_tail_and_follow(make_runtime: Callable[..., Runtime], tmp_path: Path,
                                    registry: BackendRegistry) -> None:
    vm_dirs = tmp_path / "vms"

    def with_dir(config: VmConfig, **options: Any) -> VmInstance:
        vm = MockVm(config, **options)
        vm.workdir = vm_dirs / vm.id  # type: ignore[attr-defined]
        vm.workdir.mkdir(parents=True)  # type: ignore[attr-defined]
        return vm

    registry.register(BackendSpec(name="logged", description="", capabilities=MOCK.capabilities,
                                  probe=MOCK.probe, create=with_dir, real=False))
    async with make_runtime() as rt:
        info = await rt.create(name="box", backend="logged")
        assert info.vm_dir == vm_dirs / info.id
        assert (await rt.read_logs("box")) == b""
        console = vm_dirs / info.id / "console.log"
        console.write_bytes(b"one\ntwo\nthree\n")
        assert (await rt.read_logs("box", tail=2)) == b"two\nthree\n"
        assert (await rt.read_logs("box", tail=0)) == b""

        followed: list[bytes] = []

        async def collect() -> bytes:
            async for chunk in rt.follow_logs("box", tail=0, poll_seconds=0.01):
                followed.append(chunk)
            return b"".join(followed)

        follower = asyncio.create_task(collect())
        await asyncio.sleep(0.05)  # lets the follower reach the end of the log before "four"
        with console.open("ab") as f:
            f.write(b"four\n")
        await wait_until(lambda: b"".join(followed) == b"four\n", 5, "the follower to see four")
        await rt.stop("box")
        assert await asyncio.wait_for(follower, 5) == b"four\n"
        everything = b"".join([c async for c in rt.follow_logs("box")])  # at rest: ends
        assert everything == b"one\ntwo\nthree\nfour\n"
        await rt.remove("box")
        assert not (vm_dirs / info.id).exists()


# -- the state database -----------------------------------------------------------------


def test_schema_created_from_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    path.write_bytes(b"")
    db = StateDb(path)
    assert db.version == SCHEMA_VERSION
    db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sandboxes", "events"} <= tables
    conn.close()


def test_migration_keeps_rows_of_an_older_schema(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=1) == 1
    conn.execute(
        "INSERT INTO sandboxes (id, name, backend, config, state, created_at, updated_at)"
        " VALUES ('abc123', 'old', 'mock', ?, 'stopped', 1, 1)",
        ('{"vm": {"vcpus": 1}}',),
    )
    conn.close()
    db = StateDb(path)
    assert db.version == SCHEMA_VERSION
    (old,) = db.all()
    assert (old.name, old.state, old.config.vcpus) == ("old", VmState.STOPPED, 1)
    db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StateDatabaseError, match="newer than this Kelpie knows"):
        StateDb(path)
    conn = sqlite3.connect(path)
    assert schema_version(conn) == SCHEMA_VERSION + 1  # untouched
    conn.close()


def test_a_removed_sandbox_keeps_its_history_with_a_last_event(tmp_path: Path) -> None:
    db = StateDb(tmp_path / DB_FILENAME)
    db.insert(SandboxInfo(id="abc000", name="x", backend="mock", state=VmState.CREATED,
                          config=VmConfig()))
    db.set_state("abc000", VmState.STOPPED, 2.0)
    assert len(db.events("abc000")) == 2
    db.delete("abc000", 3.0)
    assert db.get("abc000") is None
    *_, last = db.events("abc000")
    assert (last.kind, last.state, last.name, last.at) == (EventKind.REMOVED, VmState.STOPPED,
                                                          "x", 3.0)
    db.close()


def test_all_lists_exactly_the_public_names() -> None:
    """(Its order, isort-style, is checked by ruff's RUF022.)"""
    import kelpie.runtime as runtime_module

    assert len(set(runtime_module.__all__)) == len(runtime_module.__all__)
    public = {n for n in vars(runtime_module) if not n.startswith("_")} - {"annotations"}
    assert set(runtime_module.__all__) == public


async def test_main_command_output_is_the_log(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime() as rt:
        info = await rt.create(name="svc", backend="mock",
                               command=["sh", "-c", "echo up; echo oops >&2; exit 3"])
        assert info.command == ("sh", "-c", "echo up; echo oops >&2; exit 3")
        assert await rt.wait_main("svc") == 3
        assert (await rt.inspect("svc")).main_exit_code == 3
        assert (await rt.read_logs("svc")) == b"up\noops\n"
        # the sandbox outlives its command
        assert (await rt.inspect("svc")).state is VmState.RUNNING
        await rt.stop("svc")
        await rt.start("svc")  # a start runs the main command again, appending to the log
        assert await rt.wait_main("svc") == 3
        assert (await rt.read_logs("svc")) == b"up\noops\nup\noops\n"
        await rt.remove("svc", force=True)
        assert not rt.output_log(info.id).parent.exists()


async def test_a_capture_holds_the_main_log_and_records_how_much_output_it_has(
    make_runtime: Callable[..., Runtime], tmp_path: Path,
) -> None:
    # the host the sandbox moves to follows the command on from there (the guest replays
    # what was in flight); a move undone lets the log grow again
    async with make_runtime() as rt:
        info = await rt.create(name="svc", backend="mock",
                               command=["sh", "-c", "echo up; sleep 1000"])
        log = rt.output_log(info.id)
        await wait_until(lambda: log.exists() and log.read_bytes() == b"up\n", 5, "its output")
        rt.moves.hold(info.id, "test move")
        capture = await rt.moves.capture(info.id, tmp_path / "snap", SnapshotKind.FULL)
        assert capture.info.main_output_offset == 3
        assert rt.moves.record(info.id)["main_output_offset"] == 3
        await rt.moves.give_back(info.id, was_running=True)
        assert (await rt.inspect("svc")).state is VmState.RUNNING
        await rt.remove("svc", force=True)


class VirtualTime:
    """A clock that a sleep moves on at once (the runtime's timeouts, on virtual time)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def test_a_sandbox_timeout_removes_pauses_or_stops_it(
    make_runtime: Callable[..., Runtime],
) -> None:
    time = VirtualTime()
    async with make_runtime(clock=time.clock, sleep=time.sleep) as rt:
        gone = await rt.create(name="gone", backend="mock", timeout=60)
        assert (gone.expires_at, gone.on_timeout) == (1_060.0, "remove")
        napping = await rt.create(name="napping", backend="mock", timeout=120,
                                  on_timeout="pause")
        halted = await rt.create(name="halted", backend="mock")
        await rt.set_timeout("halted", 90, on_timeout="stop")
        await rt.create(name="kept", backend="mock", timeout=30)
        assert (await rt.set_timeout("kept", 10, extend_only=True)).expires_at == 1_030.0
        assert (await rt.set_timeout("kept", 40, extend_only=True)).expires_at == 1_040.0
        assert (await rt.set_timeout("kept", None)).expires_at is None
        assert (await rt.set_timeout("kept", 40, extend_only=True)).expires_at is None

        def settled() -> bool:
            nap, halt = rt.db.get(napping.id), rt.db.get(halted.id)
            return rt.db.get(gone.id) is None and nap is not None \
                and nap.state is VmState.PAUSED and halt is not None \
                and halt.state is VmState.STOPPED
        await wait_until(settled, 5, "the timeouts to pass")
        assert (await rt.inspect("napping")).expires_at is None  # it happened: gone
        assert (await rt.inspect("halted")).expires_at is None
        assert (await rt.inspect("kept")).state is VmState.RUNNING
        with pytest.raises(ConfigError, match="timeout"):
            await rt.set_timeout("kept", 0)
        with pytest.raises(ConfigError, match="on_timeout"):
            await rt.set_timeout("kept", 5, on_timeout="explode")


async def test_a_timeout_that_passed_while_no_runtime_ran_acts_at_open(
    make_runtime: Callable[..., Runtime],
) -> None:
    time = VirtualTime()

    async def never(seconds: float) -> None:
        await asyncio.Event().wait()

    async with make_runtime(clock=time.clock, sleep=never) as rt:  # time stands still
        info = await rt.create(name="late", backend="mock", start=False)
        await rt.set_timeout("late", 10)
        assert rt.moves.record(info.id)["expires_at"] == 1_010.0  # it moves with a teleport
    time.now += 11
    async with make_runtime(clock=time.clock, sleep=never) as rt:
        await wait_until(lambda: rt.db.get(info.id) is None, 5, "the late sandbox to go")


async def test_main_command_that_cannot_start(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime() as rt:
        await rt.create(name="bad", backend="mock", command=["nosuch"])
        assert await rt.wait_main("bad") == 127
        assert b"nosuch" in (await rt.read_logs("bad"))
        with pytest.raises(ConfigError, match="needs an image"):
            await rt.create(name="empty", backend="mock", command=[])


class StubbornStorage(LocalStorage):
    """Local storage that refuses to remove one path (as EBUSY or EACCES would) and, when
    asked, to open logs for appending (as a full disk would)."""

    def __init__(self, stuck: Path | None = None, *, logs_fail: bool = False) -> None:
        self.stuck = stuck
        self.logs_fail = logs_fail

    def remove_tree(self, path: Path) -> None:
        if path == self.stuck:
            raise StorageError(f"cannot remove {path}: device or resource busy")
        super().remove_tree(path)

    def open_append(self, path: Path) -> BinaryIO:
        if self.logs_fail:
            raise StorageError(f"cannot open {path}: no space left on device")
        return super().open_append(path)


async def test_a_leftover_that_cannot_be_removed_does_not_stop_the_runtime_opening(
    make_runtime: Callable[..., Runtime], tmp_path: Path,
) -> None:
    async with make_runtime() as rt:
        kept = await rt.create(name="kept", backend="mock")
        await rt.stop("kept")
    leftover = tmp_path / "data" / "sandboxes" / "deadbeef0000"
    leftover.mkdir(parents=True)
    async with make_runtime(storage=StubbornStorage(leftover)) as rt:
        assert [i.id for i in await rt.list_sandboxes(all=True)] == [kept.id]
    assert leftover.exists()  # tried again at the next open
    async with make_runtime() as rt:
        assert [i.id for i in await rt.list_sandboxes(all=True)] == [kept.id]
    assert not leftover.exists()


async def test_a_main_command_whose_log_cannot_be_written_records_an_unknown_exit(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime(storage=StubbornStorage(logs_fail=True)) as rt:
        await rt.create(name="svc", backend="mock", command=["echo", "hi"])
        assert await rt.wait_main("svc") is None
        info = await rt.inspect("svc")
        assert info.state is VmState.RUNNING and info.main_exit_code is None
