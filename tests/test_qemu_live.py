"""Live migration of a running QEMU VM into another QEMU (TCG here), through a byte relay.

One source VM runs a guest counter that appends to a file on its root disk every 50 ms.
Migrations that cannot converge, or whose target dies midway, must leave it running; the
one that completes must move the guest (same process, counter unbroken, the disk with
every write made during the migration) while the source ends paused and can still run.
Both of the target's sockets are reached through a relay that only copies bytes, as the
coordinator's link between two hosts will. A sender or a target whose process died is
found again by an attach: the sender's migration undone, the target reported crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie import BootError, SnapshotIncompatible, VmConfig, VmState
from kelpie.backends.qemu._live import (
    MIRROR_JOB,
    SEND_MARKER,
    _logs_every_write,
    _SendRun,
    _set_capabilities,
    write_send_marker,
)
from kelpie.backends.qemu._migration import UNLIMITED_BANDWIDTH
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit
from kelpie.vm import LiveMigrationDidNotConverge, LiveMigrationFailed, LiveProgress, LiveStats
from vm_fixtures import BASE_APPLETS, busybox_root_disk, short_state_dir
from waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

COUNTER = (
    b"echo $$ > /root/counter.pid; i=0; "
    b"while :; do i=$((i+1)); echo $i >> /root/counter; sleep 0.05; done\n"
)
"""The guest's counter: its value lives in the shell's memory, each step on the disk."""
MEMORY_MIB = 256
BLOB = os.urandom(2 * 1024 * 1024)
"""Written before the migration: the mirror's first copy must carry it."""


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from short_state_dir("live")


@pytest.fixture(scope="module")
def root_disk(state_dir: Path) -> Path:
    return busybox_root_disk(state_dir, (*BASE_APPLETS, "dmesg"))


def new_vm(kit: GuestKit, state_dir: Path, root_disk: Path) -> QemuVm:
    vm = QemuVm(VmConfig(root_disk=root_disk, memory_mib=MEMORY_MIB), kit=kit)
    vm.workdir = state_dir / vm.id
    return vm


async def sh(vm: QemuVm, script: str) -> str:
    result = await vm.exec(["sh", "-c", script])
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def counter_lines(vm: QemuVm) -> list[int]:
    return [int(line) for line in (await vm.read_file("/root/counter")).split()]


def counts_past(vm: QemuVm, value: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for wait_until: the guest's counter went past ``value``."""
    async def past() -> bool:
        lines = await counter_lines(vm)
        return bool(lines) and lines[-1] > value
    return past


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def source(guestkit: GuestKit, state_dir: Path, root_disk: Path) -> AsyncIterator[QemuVm]:
    vm = new_vm(guestkit, state_dir, root_disk)
    try:
        await vm.start()
        await vm.write_file("/root/counter.sh", COUNTER)
        await vm.write_file("/root/blob", BLOB)
        await sh(vm, ": > /root/counter; sh /root/counter.sh >/dev/null 2>&1 &")  # runs on
        await wait_until(counts_past(vm, 5), 30, "the guest's counter to reach 5")
        yield vm
    finally:
        await vm.stop(force=True)


@dataclasses.dataclass
class Relay:
    """A unix socket whose connections are piped, byte for byte, to another one."""

    path: Path
    target: Path
    copied: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(256 * 1024):
                self.copied += len(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.path.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def target_behind_relays(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, source: QemuVm
) -> AsyncIterator[tuple[QemuVm, Relay, Relay]]:
    """A target VM receiving ``source``'s plan (passed through JSON, as between hosts),
    its two sockets each behind a relay; stopped at the end."""
    plan = json.loads(json.dumps(await source.live_plan_document()))
    target = new_vm(guestkit, state_dir, root_disk)
    endpoints = await target.receive_live_document(plan)
    assert target.state is VmState.STARTING
    relays = (
        await Relay(state_dir / f"{target.id}-nbd", endpoints.nbd_socket).start(),
        await Relay(state_dir / f"{target.id}-mig", endpoints.migration_socket).start(),
    )
    try:
        yield target, *relays
    finally:
        for relay in relays:
            await relay.close()
        await target.abort_live()


async def no_live_leftovers(vm: QemuVm) -> None:
    """The source's QEMU holds no mirror job, NBD node or switchover pause any more."""
    assert await vm._qmp_execute("query-block-jobs") == []
    nodes = await vm._qmp_execute("query-named-block-nodes")
    assert isinstance(nodes, list)
    assert not [n for n in nodes if n.get("node-name") == "kelpie-live-target"]
    caps = await vm._qmp_execute("query-migrate-capabilities")
    assert isinstance(caps, list)
    assert {c["capability"]: c["state"] for c in caps}["pause-before-switchover"] is False


async def test_a_plan_the_target_cannot_take_is_refused_before_anything_starts(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, source: QemuVm
) -> None:
    plan = await source.live_plan()
    wrong = dataclasses.replace(plan, base_image_digest="sha256:" + "0" * 64)
    target = new_vm(guestkit, state_dir, root_disk)
    with pytest.raises(SnapshotIncompatible, match="base image sha256:0000"):
        await target.receive_live(wrong)
    assert target.state is VmState.CREATED
    assert not target.workdir.exists()


async def test_a_migration_that_cannot_converge_is_cancelled_and_the_source_runs_on(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, source: QemuVm
) -> None:
    async with target_behind_relays(guestkit, state_dir, root_disk, source) as (target, *_):
        reports: list[LiveProgress] = []
        with pytest.raises(LiveMigrationDidNotConverge, match="did not reach its switchover"):
            await source.send_live(  # 256 KiB/s cannot carry the guest's RAM in 3 s
                target.workdir / "nbd.sock", target.workdir / "migration.sock",
                converge_timeout=3, bandwidth=256 * 1024, progress=reports.append,
            )
        assert {r.phase for r in reports} == {"disk", "memory"}
    assert target.state is VmState.STOPPED
    assert source.state is VmState.RUNNING
    last = (await counter_lines(source))[-1]
    await wait_until(counts_past(source, last), 10, "the source's counter to go on")
    await no_live_leftovers(source)


async def test_a_target_that_dies_midway_fails_the_migration_and_the_source_runs_on(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, source: QemuVm
) -> None:
    async with target_behind_relays(guestkit, state_dir, root_disk, source) as (
        target, nbd, migration
    ):
        finishing = asyncio.ensure_future(target.finish_live(timeout=60))
        aborted: list[asyncio.Task[None]] = []

        def abort_once_memory_moves(report: LiveProgress) -> None:
            if report.phase == "memory" and not aborted:
                aborted.append(asyncio.ensure_future(target.abort_live()))

        with pytest.raises(LiveMigrationFailed):
            await source.send_live(
                nbd.path, migration.path, converge_timeout=60, bandwidth=1024 * 1024,
                progress=abort_once_memory_moves,
            )
        await aborted[0]
        with pytest.raises(BootError, match="exited"):  # abort_live ended its wait
            await finishing
        assert target.state is VmState.STOPPED
    assert source.state is VmState.RUNNING
    last = (await counter_lines(source))[-1]
    await wait_until(counts_past(source, last), 10, "the source's counter to go on")
    await no_live_leftovers(source)


@dataclasses.dataclass
class Moved:
    target: QemuVm
    stats: LiveStats
    pid: str
    hostname: str
    during: bytes
    """What the guest wrote to its disk while the migration ran."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def moved(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, source: QemuVm
) -> AsyncIterator[Moved]:
    pid = (await sh(source, "cat /root/counter.pid")).strip()
    hostname = await sh(source, "hostname")
    async with target_behind_relays(guestkit, state_dir, root_disk, source) as (
        target, nbd, migration
    ):
        writes: list[asyncio.Task[None]] = []
        during = os.urandom(64 * 1024)
        switchover: list[float] = []
        memory_reports = 0
        passes_made = asyncio.Event()
        converging: list[asyncio.Task[None]] = []

        async def write_then_speed_up() -> None:
            await source.write_file("/root/during", during)
            await source._qmp_execute("block-job-set-speed", device=MIRROR_JOB, speed=0)
            await source._qmp_execute("migrate-set-parameters", **{"max-bandwidth": 2**50})

        async def converge_after_passes() -> None:
            await passes_made.wait()
            await source._qmp_execute("migrate-set-parameters", **{"downtime-limit": 300})

        def follow(report: LiveProgress) -> None:
            nonlocal memory_reports
            if report.phase == "disk" and not writes:
                writes.append(asyncio.ensure_future(write_then_speed_up()))
            if report.phase == "memory":
                if not memory_reports:
                    converging.append(asyncio.ensure_future(converge_after_passes()))
                memory_reports += 1
                if memory_reports == 20:
                    passes_made.set()
            if report.phase == "switchover":
                switchover.append(time.monotonic())

        # The mirror's first copy (over 2 MiB) cannot end at 64 KiB/s before the speed-up
        # after the write, so the write lands while the guest runs and the mirror copies.
        # A 1 ms downtime limit makes QEMU sync its dirty-page log pass after pass while
        # the guest runs on (under KVM; under TCG the guest is paused for its RAM copy, as a
        # copy of a running TCG guest misses its writes: this test caught it) until the
        # limit is raised.
        send = asyncio.ensure_future(source.send_live(
            nbd.path, migration.path, converge_timeout=60, progress=follow,
            bandwidth=8 * 1024 * 1024, disk_bandwidth=64 * 1024, downtime_limit_ms=1,
        ))
        await target.finish_live(timeout=60)
        resumed = time.monotonic()
        stats = await send
        assert writes and writes[0].done(), "the write during the migration did not finish"
        await writes[0]
        for task in converging:  # not needed where one pass sufficed (the guest paused)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert nbd.copied > 0 and migration.copied > 0
        print(f"\nlive migration: {stats}; from the switchover to the target's agent "
              f"resynced: {(resumed - switchover[0]) * 1000:.0f} ms")
        yield Moved(target, stats, pid, hostname, during)


async def test_the_guest_moves_with_its_memory_and_disk(moved: Moved, source: QemuVm) -> None:
    target = moved.target
    assert target.state is VmState.RUNNING
    assert source.state is VmState.PAUSED
    assert (await sh(target, "cat /root/counter.pid")).strip() == moved.pid
    assert await sh(target, "hostname") == moved.hostname
    lines = await counter_lines(target)
    assert lines == list(range(1, len(lines) + 1)), "the counter restarted or lost a step"
    await wait_until(counts_past(target, lines[-1]), 10, "the counter to go on")
    after = await counter_lines(target)
    assert after[: len(lines)] == lines and after == list(range(1, len(after) + 1))
    assert await target.read_file("/root/during") == moved.during
    kernel_log = await sh(target, "dmesg")
    for sign in ("Oops", "BUG:", "kernel BUG", "general protection", "Kernel panic"):
        assert sign not in kernel_log, f"the guest's kernel found its memory corrupt:\n{kernel_log}"
    assert hashlib.sha256(await target.read_file("/root/blob")).digest() == \
        hashlib.sha256(BLOB).digest()
    stats = moved.stats
    assert stats.downtime_ms is not None and stats.downtime_ms >= 0
    assert stats.ram_transferred > 0 and stats.disk_mirrored >= len(BLOB)
    assert 0 < stats.switchover_ms < stats.total_seconds * 1000


async def test_the_source_runs_again_after_a_completed_migration(
    moved: Moved, source: QemuVm
) -> None:
    """The coordinator's abort after the switchover: the paused source takes over again."""
    await moved.target.stop(force=True)
    await source.resume()
    assert source.state is VmState.RUNNING
    last = (await counter_lines(source))[-1]
    await wait_until(counts_past(source, last), 10, "the source's counter to go on")
    assert (await sh(source, "cat /root/counter.pid")).strip() == moved.pid
    await no_live_leftovers(source)


async def test_an_attach_undoes_a_live_send_whose_process_died(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, source: QemuVm, moved: Moved
) -> None:
    """QEMU holds the guest at the switchover for the sender; a sender that died would
    leave it paused for good, were it not for the marker an attach finds."""
    qmp = source._qmp
    assert qmp is not None and source.state is VmState.RUNNING
    async with target_behind_relays(guestkit, state_dir, root_disk, source) as (
        _, nbd, migration
    ):
        # send_live's first steps, then its process "dies" (lets go of QEMU, undoes nothing)
        write_send_marker(source.workdir / SEND_MARKER, nbd.path, migration.path)
        run = _SendRun(source.id, qmp, lambda _: None, math.inf, 0.0)
        await _set_capabilities(qmp, switchover_pause=True)
        await run.start_mirror(nbd.path, UNLIMITED_BANDWIDTH)
        if not _logs_every_write(source):  # as send_live does: the guest paused (TCG)
            await qmp.execute("stop")
        await qmp.execute("migrate", {"uri": f"unix:{migration.path}"})

        async def at_switchover() -> bool:
            info = await qmp.execute("query-migrate")
            return isinstance(info, dict) and info.get("status") == "pre-switchover"

        await wait_until(at_switchover, 30, "QEMU to pause the guest for the switchover")
        await source.detach()
        attached = await QemuVm.attach(source.id, workdir=source.workdir, kit=guestkit)
    try:
        assert attached.state is VmState.RUNNING
        assert not (source.workdir / SEND_MARKER).exists()
        last = (await counter_lines(attached))[-1]
        await wait_until(counts_past(attached, last), 10, "the counter to go on")
        await no_live_leftovers(attached)
    finally:
        await attached.stop(force=True)


async def test_a_vm_without_a_root_disk_moves_without_a_mirror(
    guestkit: GuestKit, state_dir: Path
) -> None:
    source = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=guestkit)
    source.workdir = state_dir / source.id
    target = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=guestkit)
    target.workdir = state_dir / target.id
    try:
        await source.start()
        await sh(source, "i=0; while :; do i=$((i+1)); echo $i >> /tmp/n; sleep 0.05; done "
                         ">/dev/null 2>&1 & echo $! > /tmp/pid")
        pid = await sh(source, "cat /tmp/pid")
        endpoints = await target.receive_live(await source.live_plan())
        assert not endpoints.nbd_socket.exists()  # no disk: nothing to mirror
        send = asyncio.ensure_future(source.send_live(
            endpoints.nbd_socket, endpoints.migration_socket, converge_timeout=60
        ))
        await target.finish_live(timeout=60)
        stats = await send
        assert stats.disk_mirrored == 0 and source.state is VmState.PAUSED
        assert await sh(target, "cat /tmp/pid") == pid
        lines = [int(n) for n in (await target.read_file("/tmp/n")).split()]
        assert lines == list(range(1, len(lines) + 1))
    finally:
        await target.abort_live()
        await source.stop(force=True)


async def test_a_target_whose_process_died_is_found_crashed_by_an_attach(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, source: QemuVm
) -> None:
    """A target's QEMU waits for a migration nobody will send once its daemon died."""
    target = new_vm(guestkit, state_dir, root_disk)
    await target.receive_live_document(await source.live_plan_document())
    await target.detach()
    found = await QemuVm.attach(target.id, workdir=target.workdir, kit=guestkit)
    assert found.state is VmState.CRASHED
    assert "inmigrate" in (found.crash_reason or "")
    await found.stop()
    assert found.state is VmState.STOPPED and not (target.workdir / "qemu.pid").exists()
