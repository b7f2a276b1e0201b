"""Re-attaching to QEMU VMs that another process started (a daemon restart, in miniature).

Every VM here is started by a separate Python process that then goes away without stopping
it (it returns, calls ``os._exit`` or is SIGKILLed); the test process attaches afterwards.
These fail instead of skipping when qemu is in KELPIE_REQUIRE_BACKENDS (CI) and no VM can boot.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie import VmConfig, VmError, VmState
from kelpie.agent import ProcessWatch, read_vm_record
from kelpie.backends.qemu import SPEC
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

STARTER = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from kelpie import VmConfig
    from kelpie.backends.qemu._vm import QemuVm
    from kelpie.guestkit import build_guestkit

    async def main(workdir: str, mode: str) -> None:
        vm = QemuVm(VmConfig(), workdir=Path(workdir), kit=build_guestkit())
        await vm.start()
        await vm.write_file("/tmp/before", b"written before the attach\\n")
        if mode == "paused":
            await vm.pause()
        if mode == "exec":
            async with vm.exec_stream(["sleep", "600"]):
                print(vm.id, flush=True)
                os._exit(0)  # gone mid-exec, as a crashing daemon would be
        print(vm.id, flush=True)
        if mode == "wait-for-kill":
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)
"""Starts a VM in ``workdir``, prints its id, and leaves without stopping it (per mode)."""


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    path = Path(f"/tmp/kelpie-attach-{os.getpid()}")  # short: unix socket paths live here
    path.mkdir(exist_ok=True)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


async def start_elsewhere(workdir: Path, mode: str = "return") -> str:
    """Start a VM from another Python process that then goes away; return the VM's id.

    Modes: ``return`` (the script ends normally), ``exec`` (it leaves with ``os._exit``
    while ``sleep 600`` runs in the guest), ``paused`` (it pauses the VM, then ends),
    ``wait-for-kill`` (it is SIGKILLed here after printing the id).
    """
    starter = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STARTER, str(workdir), mode,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert starter.stdout is not None and starter.stderr is not None
    line = await asyncio.wait_for(starter.stdout.readline(), 180)
    if mode == "wait-for-kill" and line:
        starter.kill()
    _, err = await asyncio.wait_for(starter.communicate(), 60)
    assert line, f"the starter printed no VM id:\n{err.decode(errors='replace')}"
    assert starter.returncode == (-signal.SIGKILL if mode == "wait-for-kill" else 0), err
    return line.decode().strip()


def qemu_pid(workdir: Path) -> int:
    return int((workdir / "qemu.pid").read_text())


def has_exited(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: os.kill(pid, 0) would still succeed)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], 0)[0])
    finally:
        os.close(fd)


async def kill_and_wait(pid: int) -> None:
    """SIGKILL a process this test did not start, and wait for its exit through a pidfd."""
    watch = ProcessWatch(pid, child=False)
    os.kill(pid, signal.SIGKILL)
    await asyncio.wait_for(watch.wait(), 30)


def crashed_event(vm: QemuVm) -> asyncio.Event:
    event = asyncio.Event()
    vm.observe(lambda _vm, _old, new: event.set() if new is VmState.CRASHED else None)
    return event


async def assert_stop_cleans_up(vm: QemuVm, pid: int | None) -> None:
    await vm.stop()
    assert vm.state is VmState.STOPPED
    if pid is not None:
        assert has_exited(pid)
    for name in ("qmp.sock", "agent.sock", "qemu.pid"):
        assert not (vm.workdir / name).exists(), f"{name} survived stop"
    assert (vm.workdir / "config.json").exists(), "stop must leave the VM directory"


@pytest.mark.parametrize("mode", ["return", "wait-for-kill"])
async def test_attach_to_a_vm_whose_starter_is_gone(
    guestkit: GuestKit, state_dir: Path, mode: str
) -> None:
    workdir = state_dir / f"a-{mode}"
    vm_id = await start_elsewhere(workdir, mode)
    pid = qemu_pid(workdir)
    assert not has_exited(pid), "QEMU died with the process that started it"

    vm = await QemuVm.attach(vm_id, workdir=workdir, kit=guestkit)
    assert vm.id == vm_id and vm.state is VmState.RUNNING and vm.pid == pid
    assert vm.transitions == [(VmState.CREATED, VmState.STARTING),
                              (VmState.STARTING, VmState.RUNNING)]
    assert vm.agent_info is not None and vm.agent_info.execs == ()
    assert (await vm.exec(["echo", "attached"])).stdout == b"attached\n"
    assert await vm.read_file("/tmp/before") == b"written before the attach\n"
    await assert_stop_cleans_up(vm, pid)


async def test_exec_of_the_starter_is_listed_and_a_crash_is_seen(
    guestkit: GuestKit, state_dir: Path
) -> None:
    workdir = state_dir / "b"
    vm_id = await start_elsewhere(workdir, "exec")
    vm = await QemuVm.attach(vm_id, workdir=workdir, kit=guestkit)
    assert vm.agent_info is not None
    running = [e for e in vm.agent_info.execs if e.running]
    assert [e.argv for e in running] == [("sleep", "600")], vm.agent_info.execs

    # Not our child: the pidfd, not a child watcher, must notice QEMU dying.
    crashed = crashed_event(vm)
    pid = qemu_pid(workdir)
    os.kill(pid, signal.SIGKILL)
    await asyncio.wait_for(crashed.wait(), 30)
    assert vm.crash_reason is not None and f"pid {pid}" in vm.crash_reason
    assert "exit status is unknown" in vm.crash_reason
    await assert_stop_cleans_up(vm, pid)


async def test_paused_vm_reattaches_paused(guestkit: GuestKit, state_dir: Path) -> None:
    workdir = state_dir / "c"
    vm_id = await start_elsewhere(workdir, "paused")
    vm = await QemuVm.attach(vm_id, workdir=workdir, kit=guestkit)
    assert vm.state is VmState.PAUSED
    info_while_paused = vm.agent_info
    assert info_while_paused is None  # a paused guest cannot answer hello: it comes on resume
    await vm.resume()
    assert vm.transitions[-1] == (VmState.PAUSED, VmState.RUNNING)
    assert vm.agent_info is not None and vm.agent_info.execs == ()
    assert await vm.read_file("/tmp/before") == b"written before the attach\n"
    await assert_stop_cleans_up(vm, qemu_pid(workdir))


async def test_qemu_killed_while_detached_attaches_as_crashed(
    guestkit: GuestKit, state_dir: Path
) -> None:
    workdir = state_dir / "d"
    vm_id = await start_elsewhere(workdir)
    pid = qemu_pid(workdir)
    await kill_and_wait(pid)

    vm = await QemuVm.attach(vm_id, workdir=workdir, kit=guestkit)
    assert vm.state is VmState.CRASHED
    assert vm.crash_reason is not None
    assert f"QEMU (pid {pid}) is no longer running" in vm.crash_reason
    assert "--- console.log ---" in vm.crash_reason
    await assert_stop_cleans_up(vm, None)


async def test_stale_pid_file_naming_another_process_is_not_the_vm(
    guestkit: GuestKit, state_dir: Path
) -> None:
    workdir = state_dir / "e"
    vm_id = await start_elsewhere(workdir)
    await kill_and_wait(qemu_pid(workdir))
    (workdir / "qemu.pid").write_text(f"{os.getpid()}\n")  # alive, but not a QEMU

    vm = await QemuVm.attach(vm_id, workdir=workdir, kit=guestkit)
    assert vm.state is VmState.CRASHED
    assert vm.crash_reason is not None and "not this VM's QEMU" in vm.crash_reason
    assert vm.pid is None
    await assert_stop_cleans_up(vm, None)  # and this test process is still alive to check


async def test_attach_while_another_client_holds_the_vm_fails_and_leaves_it(
    guestkit: GuestKit, state_dir: Path
) -> None:
    workdir = state_dir / "busy"
    holder = QemuVm(VmConfig(), workdir=workdir, kit=guestkit)
    await holder.start()
    try:
        with pytest.raises(VmError, match=r"QMP greeting \(is another process attached\?\)"):
            await QemuVm.attach(holder.id, workdir=workdir, kit=guestkit, timeout=3)
        assert (await holder.exec(["echo", "untouched"])).stdout == b"untouched\n"
    finally:
        await holder.stop()


async def test_stop_kills_a_qemu_this_object_could_not_attach_to(
    guestkit: GuestKit, state_dir: Path
) -> None:
    """A sandbox whose re-attach failed (QEMU alive but unreachable) is removed for real."""
    workdir = state_dir / "unreachable"
    holder = QemuVm(VmConfig(), workdir=workdir, kit=guestkit)
    await holder.start()
    pid = qemu_pid(workdir)
    crashed = crashed_event(holder)
    stranger = QemuVm(VmConfig(), vm_id=holder.id, workdir=workdir, kit=guestkit)
    await stranger.stop()  # never attached: it finds the directory's QEMU and stops it
    await asyncio.wait_for(crashed.wait(), 30)  # the holder sees its QEMU die
    assert has_exited(pid) and not (workdir / "qemu.pid").exists()
    await holder.stop()


async def test_directory_without_config_is_not_a_vm(state_dir: Path) -> None:
    workdir = state_dir / "f"
    workdir.mkdir()
    with pytest.raises(VmError, match=r"no Kelpie VM 'f'.*no config\.json"):
        await QemuVm.attach("f", workdir=workdir)
    (workdir / "config.json").write_text("{not json")
    with pytest.raises(VmError, match="is not a Kelpie VM record"):
        await QemuVm.attach("f", workdir=workdir)
    (workdir / "config.json").write_text('{"id": "other", "backend": "qemu", "config": {}}')
    with pytest.raises(VmError, match="describes 'qemu' VM 'other', expected 'qemu' VM 'f'"):
        await QemuVm.attach("f", workdir=workdir)


async def test_spec_attaches_by_id_in_the_state_dir(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KELPIE_STATE_DIR", str(state_dir))
    assert SPEC.attach is not None
    with pytest.raises(VmError, match="no Kelpie VM 'missing'"):
        await SPEC.attach("missing")
    with pytest.raises(ValueError, match="not a Kelpie VM id"):
        await SPEC.attach("../escape")


async def test_config_round_trips_through_the_vm_record(tmp_path: Path) -> None:
    config = VmConfig(memory_mib=384, env={"A": "b"})
    record = {"id": "abc", "backend": "qemu", "config": config.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert read_vm_record(tmp_path, "abc", "qemu") == config
    with pytest.raises(VmError, match="expected 'mock' VM 'abc'"):
        read_vm_record(tmp_path, "abc", "mock")
