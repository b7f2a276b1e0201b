"""Full and disk snapshots of real QEMU VMs, and restores into new VMs (TCG here).

One source VM (a busybox root disk, a counter running in the guest) is snapshotted once;
the tests restore that snapshot, break copies of it, and cancel another snapshot midway.
These fail instead of skipping when qemu is in KELPIE_REQUIRE_BACKENDS (CI) and no VM can boot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie import (
    ExecError,
    Mount,
    SnapshotCorrupted,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotKind,
    VmConfig,
    VmSnapshot,
    VmState,
)
from kelpie.backends.qemu import CAPABILITIES
from kelpie.backends.qemu._host import qemu_version
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit
from test_qemu_base_digest import sparse_sha256
from vm_fixtures import busybox_root_disk, short_state_dir
from waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

COUNTER = b"echo $$ > /tmp/counter.pid; i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; " \
    b"mv /tmp/count.new /tmp/count; sleep 0.1; done\n"
"""A guest process whose memory (its shell variable ``i``) a full snapshot must keep."""


@dataclasses.dataclass
class Taken:
    snapshot: VmSnapshot
    count: int
    """The counter just before the snapshot."""
    counter_pid: str


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from short_state_dir("snap")


@pytest.fixture(scope="module")
def root_disk(state_dir: Path) -> Path:
    """A small ext4 root filesystem with static busybox, like an image's disk."""
    return busybox_root_disk(state_dir)


def new_vm(kit: GuestKit, state_dir: Path, **config: object) -> QemuVm:
    vm = QemuVm(VmConfig(**config), kit=kit)  # type: ignore[arg-type]
    vm.workdir = state_dir / vm.id
    return vm


async def sh(vm: QemuVm, script: str) -> str:
    result = await vm.exec(["sh", "-c", script])
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def count(vm: QemuVm) -> int:
    return int((await sh(vm, "cat /tmp/count")).strip())


def counts_past(vm: QemuVm, value: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for wait_until: the guest's counter went past ``value``."""
    async def past() -> bool:
        return await count(vm) > value
    return past


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def source(guestkit: GuestKit, state_dir: Path, root_disk: Path) -> AsyncIterator[QemuVm]:
    vm = new_vm(guestkit, state_dir, root_disk=root_disk)
    await vm.start()
    await vm.write_file("/tmp/counter.sh", COUNTER)
    await sh(vm, "sh /tmp/counter.sh >/dev/null 2>&1 &")  # runs on after the exec ends
    await sh(vm, "echo kept > /root/before")
    yield vm
    await vm.stop(force=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def taken(source: QemuVm, state_dir: Path) -> Taken:
    async def counted_to_10() -> int | None:  # so that a counter restarted at 0 shows
        return value if (value := await count(source)) >= 10 else None

    before = await wait_until(counted_to_10, 30, "the guest's counter to reach 10")
    pid = (await sh(source, "cat /tmp/counter.pid")).strip()
    snapshot = await source.snapshot(state_dir / "full")
    await sh(source, "echo lost > /root/after")  # after the snapshot: not in it
    return Taken(snapshot, before, pid)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clones(guestkit: GuestKit, state_dir: Path, taken: Taken) -> AsyncIterator[
    list[QemuVm]
]:
    """Two restores of the snapshot into new VMs; the second one restored paused."""
    first, second = new_vm(guestkit, state_dir), new_vm(guestkit, state_dir)
    await first.restore(VmSnapshot.open(taken.snapshot.path))
    await second.restore(VmSnapshot.open(taken.snapshot.path), paused=True)
    assert second.state is VmState.PAUSED
    await second.resume()  # the guest is resynced when it first runs
    yield [first, second]
    for vm in (first, second):
        await vm.stop(force=True)


async def test_capabilities() -> None:
    assert CAPABILITIES.snapshot_kinds == {
        SnapshotKind.FULL, SnapshotKind.DISK, SnapshotKind.CHECKPOINT
    }


async def test_full_snapshot_manifest_and_source_keeps_running(
    source: QemuVm, taken: Taken, root_disk: Path, guestkit: GuestKit
) -> None:
    manifest = taken.snapshot.manifest
    assert sorted(manifest.blobs) == ["disk.qcow2", "memory"]
    assert manifest.kind is SnapshotKind.FULL
    assert (manifest.backend, manifest.machine) == ("qemu", "microvm")
    assert manifest.backend_version == qemu_version(shutil.which("qemu-system-x86_64") or "")
    assert manifest.arch == "x86_64" and manifest.cpu_model in ("qemu64", "host")
    assert (manifest.vcpus, manifest.memory_mib) == (source.config.vcpus, 512)
    assert manifest.guestkit_digest == guestkit.digest
    assert manifest.base_image_digest == sparse_sha256(root_disk.read_bytes())
    record = manifest.extra["qemu"]
    assert record["config"]["root_disk"] == str(root_disk)
    assert record["base_image"] == {"path": str(root_disk.resolve()), "format": "raw"}
    assert "-M" in record["signature"] and "virtio-blk-device,drive=root" in record["signature"]
    taken.snapshot.verify()
    assert not list(taken.snapshot.path.parent.glob(".*.partial"))
    # The source runs on: same counter process, still counting, its disk writable.
    assert source.state is VmState.RUNNING
    assert await count(source) >= taken.count
    assert (await sh(source, "cat /root/after")) == "lost\n"


async def test_restore_resumes_the_guest_memory(clones: list[QemuVm], taken: Taken) -> None:
    for vm in clones:
        assert vm.state is VmState.RUNNING
        resumed = await count(vm)
        # The counter goes on from where it was, in the same process: not from 0.
        assert taken.count <= resumed < taken.count + 100, (taken.count, resumed)
        assert (await sh(vm, "cat /tmp/counter.pid")).strip() == taken.counter_pid
        await sh(vm, f"kill -0 {taken.counter_pid}")
        await wait_until(counts_past(vm, resumed), 10, "the restored counter to count")


async def test_restore_has_the_disk_as_it_was(clones: list[QemuVm]) -> None:
    for vm in clones:
        assert await sh(vm, "cat /root/before") == "kept\n"
        missing = await vm.exec(["cat", "/root/after"])
        assert missing.exit_code != 0, "a file written after the snapshot came back"


async def test_restores_get_their_own_identity(
    clones: list[QemuVm], source: QemuVm
) -> None:
    names = [(await sh(vm, "hostname")).strip() for vm in (source, *clones)]
    assert names == [f"kelpie-{vm.id[:8]}" for vm in (source, *clones)]
    random = [await sh(vm, "head -c 16 /dev/urandom | od -An -tx1") for vm in clones]
    assert random[0] != random[1], "two restores of one snapshot share their RNG"
    for vm in clones:  # the clock was set to the host's on restore
        assert abs(int(await sh(vm, "date +%s")) - time.time()) < 3


def broken_copy(snapshot: VmSnapshot, where: Path) -> Path:
    """A copy of ``snapshot`` (blobs hard-linked: break them by replacing, not editing)."""
    shutil.copytree(snapshot.path, where, copy_function=os.link)
    return where


def assert_no_qemu_started(vm: QemuVm) -> None:
    assert vm.state in (VmState.CREATED, VmState.STOPPED)
    assert vm.pid is None and not (vm.workdir / "qemu.log").exists()


async def test_corrupted_memory_is_refused_before_qemu_starts(
    guestkit: GuestKit, state_dir: Path, taken: Taken
) -> None:
    copy = broken_copy(taken.snapshot, state_dir / "bad-memory")
    data = bytearray((copy / "memory").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "memory").unlink()
    (copy / "memory").write_bytes(bytes(data))
    vm = new_vm(guestkit, state_dir)
    with pytest.raises(SnapshotCorrupted, match=r"blob 'memory' has sha256 .*\(corrupted\)"):
        await vm.restore(VmSnapshot.open(copy))
    assert_no_qemu_started(vm)


async def test_truncated_disk_is_refused_before_qemu_starts(
    guestkit: GuestKit, state_dir: Path, taken: Taken
) -> None:
    copy = broken_copy(taken.snapshot, state_dir / "bad-disk")
    data = (copy / "disk.qcow2").read_bytes()
    (copy / "disk.qcow2").unlink()
    (copy / "disk.qcow2").write_bytes(data[:-4096])
    vm = new_vm(guestkit, state_dir)
    with pytest.raises(SnapshotCorrupted, match=r"blob 'disk.qcow2' is \d+ bytes.*truncated"):
        await vm.restore(VmSnapshot.open(copy))
    assert_no_qemu_started(vm)


async def test_snapshot_of_another_arch_is_refused_before_qemu_starts(
    guestkit: GuestKit, state_dir: Path, taken: Taken
) -> None:
    copy = broken_copy(taken.snapshot, state_dir / "other-arch")
    manifest = dataclasses.replace(taken.snapshot.manifest, arch="aarch64")
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_bytes(manifest.to_json())  # a valid manifest, checksum too
    vm = new_vm(guestkit, state_dir)
    with pytest.raises(SnapshotIncompatible, match="architecture: snapshot is aarch64, this "
                                                   "host is x86_64"):
        await vm.restore(VmSnapshot.open(copy))
    assert_no_qemu_started(vm)


async def test_changed_devices_are_refused_before_qemu_starts(
    guestkit: GuestKit, state_dir: Path, taken: Taken
) -> None:
    copy = broken_copy(taken.snapshot, state_dir / "other-devices")
    record = dict(taken.snapshot.manifest.extra["qemu"])
    record["signature"] = [*record["signature"], "-device", "virtio-balloon-device"]
    manifest = dataclasses.replace(taken.snapshot.manifest, extra={"qemu": record})
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_bytes(manifest.to_json())
    vm = new_vm(guestkit, state_dir)
    with pytest.raises(SnapshotIncompatible, match=r"QEMU devices: .*virtio-balloon-device"):
        await vm.restore(VmSnapshot.open(copy))
    assert_no_qemu_started(vm)


async def test_a_guest_booted_before_arat_restores_with_the_cpu_it_booted_with(
    guestkit: GuestKit, state_dir: Path, source: QemuVm, taken: Taken
) -> None:
    """x86_64 TCG guests boot with ``-cpu qemu64,+arat`` (tickless idle); a snapshot taken
    by a Kelpie before that recorded no ``-cpu``, and restores on the plain qemu64."""
    record = dict(taken.snapshot.manifest.extra["qemu"])
    signature = list(record["signature"])
    if source.accel is None or source.accel.accel != "tcg":
        pytest.skip("the -cpu of an x86_64 guest under KVM is the host's")  # not on CI hosts
    assert "arat" in (await source.read_file("/proc/cpuinfo")).decode()
    at = signature.index("-cpu")
    assert signature[at + 1] == "qemu64,+arat"
    record["signature"] = signature[:at] + signature[at + 2:]  # as an older Kelpie wrote it
    copy = broken_copy(taken.snapshot, state_dir / "before-arat")
    manifest = dataclasses.replace(taken.snapshot.manifest, extra={"qemu": record})
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_bytes(manifest.to_json())
    vm = new_vm(guestkit, state_dir)
    await vm.restore(VmSnapshot.open(copy))
    try:
        assert vm.pid is not None
        argv = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-cpu" not in argv
        assert await count(vm) >= taken.count
    finally:
        await vm.stop(force=True)


async def test_missing_base_image_is_refused_before_qemu_starts(
    guestkit: GuestKit, state_dir: Path, taken: Taken, root_disk: Path
) -> None:
    away = root_disk.with_name("moved-away.ext4")
    vm = new_vm(guestkit, state_dir)
    root_disk.rename(away)
    try:
        with pytest.raises(SnapshotIncompatible) as info:
            await vm.restore(VmSnapshot.open(taken.snapshot.path))
    finally:
        away.rename(root_disk)
    message = str(info.value)
    assert str(taken.snapshot.manifest.base_image_digest) in message
    assert f"{root_disk.resolve()} does not exist" in message
    assert_no_qemu_started(vm)
    # Given a root disk with the right content at another path, the restore finds it there.
    shutil.copy(root_disk, away)
    elsewhere = new_vm(guestkit, state_dir, root_disk=away)
    root_disk.rename(root_disk.with_name("hidden.ext4"))
    try:
        await elsewhere.restore(VmSnapshot.open(taken.snapshot.path))
        assert await sh(elsewhere, "cat /root/before") == "kept\n"
        assert elsewhere.config.root_disk == away
    finally:
        root_disk.with_name("hidden.ext4").rename(root_disk)
        await elsewhere.stop(force=True)


async def test_restore_in_place_interrupts_the_old_commands(
    guestkit: GuestKit, state_dir: Path, taken: Taken
) -> None:
    vm = new_vm(guestkit, state_dir)
    await vm.restore(VmSnapshot.open(taken.snapshot.path))
    async with vm.exec_stream(["sh", "-c", "echo started; exec sleep 100"]) as process:
        async for event in process:
            assert getattr(event, "data", b"") == b"started\n"
            break
        await vm.stop(force=True)
        await vm.restore(VmSnapshot.open(taken.snapshot.path))  # the same VM object
        with pytest.raises(ExecError, match=r"was restored from snapshot .* while this "
                                            r"command ran"):
            await process.wait()
    try:
        assert vm.state is VmState.RUNNING
        assert (await sh(vm, "hostname")).strip() == f"kelpie-{vm.id[:8]}"
        assert await count(vm) >= taken.count
    finally:
        await vm.stop(force=True)


async def test_cancelled_snapshot_leaves_nothing_and_the_vm_runs(
    source: QemuVm, state_dir: Path, taken: Taken
) -> None:
    dest = state_dir / "cancelled"
    partial_memory = state_dir / ".cancelled.partial" / "memory"
    source.snapshot_bandwidth = 8 * 1024 * 1024  # seconds for ~100 MB: time to cancel it
    try:
        task = asyncio.create_task(source.snapshot(dest))
        await wait_until(lambda: task.done() or (partial_memory.exists() and
                                                  partial_memory.stat().st_size > 1 << 20),
                         30, "the migration to begin")
        assert not task.done(), "the snapshot ended before it could be cancelled"
        task.cancel()  # as if the process taking the snapshot went away mid-migration
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        source.snapshot_bandwidth = 1 << 50
    assert not dest.exists() and not partial_memory.parent.exists()
    with pytest.raises(SnapshotCorrupted):
        VmSnapshot.open(dest)
    assert source.state is VmState.RUNNING
    before = await count(source)
    await wait_until(counts_past(source, before), 10, "the guest to run again")
    # ...and can be snapshotted again.
    again = await source.snapshot(state_dir / "after-cancel")
    again.verify()


async def test_snapshot_left_paused_then_snapshotted_again(
    source: QemuVm, state_dir: Path, taken: Taken
) -> None:
    first = await source.snapshot(state_dir / "left-paused", leave_paused=True)
    assert source.state is VmState.PAUSED
    second = await source.snapshot(state_dir / "paused-again")  # QEMU: "postmigrate"
    assert source.state is VmState.PAUSED
    assert second.manifest.blobs["memory"].size > 0 and first.manifest.kind is SnapshotKind.FULL
    await source.resume()
    before = await count(source)
    await wait_until(counts_past(source, before), 10, "the resumed guest to count")
    assert await sh(source, "echo still writable > /root/later; cat /root/later") == (
        "still writable\n"
    )


async def test_snapshot_of_a_vm_with_a_share_fails_cleanly(
    guestkit: GuestKit, state_dir: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    vm = new_vm(guestkit, state_dir, mounts=(Mount(shared, "/data"),))
    await vm.start()
    try:
        with pytest.raises(SnapshotError, match="shared directory"):
            await vm.snapshot(state_dir / "with-share")
        assert not (state_dir / "with-share").exists()
        assert not (state_dir / ".with-share.partial").exists()
        assert vm.state is VmState.RUNNING
        assert await sh(vm, "echo alive") == "alive\n"
    finally:
        await vm.stop(force=True)


async def test_disk_snapshot_of_a_stopped_vm_boots_fresh(
    guestkit: GuestKit, state_dir: Path, source: QemuVm, taken: Taken
) -> None:
    await source.stop()  # graceful: the guest syncs its disk before powering off
    snapshot = await source.snapshot(state_dir / "disk", kind=SnapshotKind.DISK)
    assert snapshot.manifest.kind is SnapshotKind.DISK
    assert sorted(snapshot.manifest.blobs) == ["disk.qcow2"]
    assert snapshot.manifest.base_image_digest == taken.snapshot.manifest.base_image_digest
    vm = new_vm(guestkit, state_dir)
    await vm.restore(VmSnapshot.open(snapshot.path))
    try:
        assert vm.state is VmState.RUNNING
        assert await sh(vm, "cat /root/before /root/after") == "kept\nlost\n"
        assert (await vm.exec(["cat", "/tmp/count"])).exit_code != 0  # booted, not resumed
        assert (await sh(vm, "hostname")).strip() == f"kelpie-{vm.id[:8]}"
    finally:
        await vm.stop(force=True)
