"""Full snapshots whose process is SIGKILLed half-way (a daemon dying mid-snapshot).

A separate Python process starts a VM (or a runtime with a sandbox), starts a full snapshot
with QEMU's bandwidth lowered so that it lasts, and is SIGKILLed here once the memory file
has grown past 1 MiB: the guest is then paused in QEMU, possibly still being migrated, and
the snapshot's partial directory is left. Attaching from this process must undo it: the
migration cancelled, the guest running again (or paused, if it was, or if the snapshot was
to leave it paused), the partial snapshot gone and no valid snapshot anywhere.
These fail instead of skipping when qemu is in KELPIE_REQUIRE_BACKENDS (CI) and no VM can boot.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie import SnapshotCorrupted, VmConfig, VmSnapshot, VmState
from kelpie.backends.qemu._machine import SNAPSHOT_MARKER
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit
from kelpie.runtime import Runtime
from vm_fixtures import busybox_root_disk, short_state_dir
from waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

SLOW = 2 * 1024 * 1024
"""Bytes per second: a snapshot of a fresh 512 MiB guest then takes tens of seconds."""
FAST_ENOUGH = 64 * 1024 * 1024
"""Bytes per second: the snapshot ends a second or two after its process was killed."""

SNAPSHOTTER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from kelpie import VmConfig
    from kelpie.backends.qemu._vm import QemuVm
    from kelpie.guestkit import build_guestkit

    async def main(workdir: str, root_disk: str, dest: str, mode: str, bandwidth: str) -> None:
        vm = QemuVm(VmConfig(root_disk=Path(root_disk)), workdir=Path(workdir),
                    kit=build_guestkit())
        await vm.start()
        await vm.exec(["sh", "-c", "echo kept > /root/before"])
        if mode == "paused":
            await vm.pause()
        vm.snapshot_bandwidth = int(bandwidth)
        print(vm.id, flush=True)
        await vm.snapshot(Path(dest), leave_paused=mode == "leave-paused")
        print("the snapshot ended before the kill", flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)
"""Starts a VM, prints its id, then takes a full snapshot until it is SIGKILLed."""

RUNTIME_SNAPSHOTTER = textwrap.dedent(
    """
    import asyncio, sys
    from kelpie.guestkit import build_guestkit
    from kelpie.runtime import Runtime

    async def main(data_dir: str, bandwidth: str) -> None:
        rt = Runtime(data_dir=data_dir, backend_options={"qemu": {"kit": build_guestkit()}})
        await rt.open()
        info = await rt.create(name="victim", backend="qemu")
        await rt.write_file(info.id, "/tmp/before", b"kept")
        rt._vms[info.id].snapshot_bandwidth = int(bandwidth)
        print(info.id, flush=True)
        await rt.snapshot(info.id, name="never")
        print("the snapshot ended before the kill", flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)
"""A runtime (a daemon, in miniature) that snapshots its sandbox until it is SIGKILLed."""


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from short_state_dir("crash")


@pytest.fixture(scope="module")
def root_disk(state_dir: Path) -> Path:
    """A small ext4 root filesystem with static busybox (the guest's disk must come back
    writable: QEMU inactivates the disks when a migration completes)."""
    return busybox_root_disk(state_dir)


async def snapshot_then_kill(
    argv: list[str], memory_glob: Path, *, env: dict[str, str] | None = None,
) -> str:
    """Run a snapshotter; SIGKILL it once a ``memory_glob`` file passed 1 MiB; its id."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 180)
        assert line, (await process.stderr.read()).decode(errors="replace")
        await wait_until(lambda: process.returncode is not None or any(
            f.stat().st_size > 1 << 20 for f in memory_glob.parent.glob(
                memory_glob.name + "/memory")), 60, "the snapshot's memory file to grow")
        assert process.returncode is None, "the snapshotter exited before the kill"
        process.send_signal(signal.SIGKILL)  # as a daemon killed mid-snapshot
    finally:
        if process.returncode is None:
            process.kill()
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == -signal.SIGKILL, err.decode(errors="replace")
    assert b"ended before the kill" not in out
    return line.decode().strip()


async def wait_until_migrated(workdir: Path, limit: float = 60) -> None:
    """Wait until QEMU reports the (orphaned) migration completed, asking it over QMP: the
    killed snapshotter no longer holds the QMP socket."""
    from qemu.qmp import QMPClient

    qmp = QMPClient("crash-test")
    await qmp.connect(str(workdir / "qmp.sock"))
    try:
        async def completed() -> bool:
            info = await qmp.execute("query-migrate")
            assert isinstance(info, dict)
            return info.get("status") == "completed"

        await wait_until(completed, limit, "QEMU's migration to complete", interval=0.1)
    finally:
        await qmp.disconnect()


def assert_no_snapshot(dest: Path) -> None:
    assert not dest.exists()
    assert not dest.with_name(f".{dest.name}.partial").exists()
    with pytest.raises(SnapshotCorrupted):
        VmSnapshot.open(dest)


@pytest.mark.parametrize(
    ("mode", "bandwidth", "migration", "state"),
    [
        ("running", SLOW, "cancelled", VmState.RUNNING),
        ("running", FAST_ENOUGH, "completed", VmState.RUNNING),
        ("leave-paused", SLOW, "cancelled", VmState.PAUSED),
        ("paused", SLOW, "cancelled", VmState.PAUSED),
    ],
    ids=["mid-migration", "after-migration", "leave-paused", "paused-before"],
)
async def test_attach_undoes_a_snapshot_whose_process_was_killed(
    guestkit: GuestKit, state_dir: Path, root_disk: Path,
    mode: str, bandwidth: int, migration: str, state: VmState,
) -> None:
    name = f"{mode[:5]}-{bandwidth >> 20}"
    workdir, dest = state_dir / f"vm-{name}", state_dir / f"snap-{name}"
    partial = dest.with_name(f".{dest.name}.partial")
    vm_id = await snapshot_then_kill(
        [SNAPSHOTTER, str(workdir), str(root_disk), str(dest), mode, str(bandwidth)], partial
    )
    assert (workdir / SNAPSHOT_MARKER).exists(), "the snapshot left no marker"
    if migration == "completed":
        await wait_until_migrated(workdir)  # QEMU finished alone: "postmigrate"
    else:
        assert partial.exists()

    vm = await QemuVm.attach(vm_id, workdir=workdir, kit=guestkit)
    try:
        assert vm.state is state, vm.crash_reason
        assert vm.recovered_snapshot == str(dest)
        assert vm._qmp is not None
        info = await vm._qmp.execute("query-migrate")
        assert isinstance(info, dict) and info.get("status") == migration, info
        assert not (workdir / SNAPSHOT_MARKER).exists()
        assert_no_snapshot(dest)
        if state is VmState.PAUSED:
            await vm.resume()
        # The guest runs, and its disk is writable again (re-activated after a migration).
        result = await vm.exec(["sh", "-c", "cat /root/before; echo new > /root/after; sync"])
        assert (result.exit_code, result.stdout) == (0, b"kept\n"), result
        # ...and can be snapshotted again, to the very destination the killed one had.
        again = await vm.snapshot(dest)
        again.verify()
        assert vm.state is VmState.RUNNING and not (workdir / SNAPSHOT_MARKER).exists()
        assert (await vm.exec(["cat", "/root/after"])).stdout == b"new\n"
    finally:
        await vm.stop(force=True)


async def test_a_snapshot_completed_in_process_leaves_no_marker(
    guestkit: GuestKit, state_dir: Path, root_disk: Path
) -> None:
    vm = QemuVm(VmConfig(root_disk=root_disk), workdir=state_dir / "ok", kit=guestkit)
    await vm.start()
    try:
        await vm.snapshot(state_dir / "ok-snap", leave_paused=True)
        assert vm.state is VmState.PAUSED and not (vm.workdir / SNAPSHOT_MARKER).exists()
        await vm.snapshot(state_dir / "ok-snap-2")  # of a paused guest: marked, then removed
        assert vm.state is VmState.PAUSED and not (vm.workdir / SNAPSHOT_MARKER).exists()
    finally:
        await vm.stop(force=True)


async def test_runtime_reopened_after_a_kill_mid_snapshot_records_the_sandbox_running(
    guestkit: GuestKit, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = state_dir / "rt"
    data_dir.mkdir()
    env = {**os.environ, "KELPIE_STATE_DIR": str(data_dir)}
    sandbox_id = await snapshot_then_kill(
        [RUNTIME_SNAPSHOTTER, str(data_dir), str(SLOW)], data_dir / "snapshots" / ".*.partial",
        env=env,
    )
    monkeypatch.setenv("KELPIE_STATE_DIR", str(data_dir))  # the backend finds VMs there
    async with Runtime(data_dir=data_dir, backend_options={"qemu": {"kit": guestkit}}) as rt:
        info = await rt.inspect(sandbox_id)
        try:
            assert info.state is VmState.RUNNING, info
            assert (await rt.list_snapshots()) == []
            assert list((data_dir / "snapshots").iterdir()) == []
            assert await rt.read_file(sandbox_id, "/tmp/before") == b"kept"
            taken = await rt.snapshot(sandbox_id, name="after-the-crash")
            assert (await rt.inspect(sandbox_id)).state is VmState.RUNNING
            assert taken.path is not None
            VmSnapshot.open(taken.path).verify()
        finally:
            await rt.remove(sandbox_id, force=True)
