"""What is QEMU's own in real VMs (TCG here): process and socket cleanup, boot retries and
failures, the stop grace, the agent's framing and process-group kill, root disks, shares
and NAT.

What every backend does (exec, files, signals, PTY, pause, snapshots, crash detection) is
tested once for all of them in test_backend_behaviour.py. These fail instead of skipping
when KELPIE_REQUIRE_BACKENDS names qemu (CI) and no VM can boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie import (
    BootError,
    ConfigError,
    ExecTimeout,
    VmConfig,
    VmState,
)
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # short: unix socket paths live here
    path = Path(f"/tmp/kelpie-test-{os.getpid()}")
    path.mkdir(exist_ok=True)
    yield path  # type: ignore[misc]
    subprocess.run(["rm", "-rf", str(path)], check=False)


def new_vm(kit: GuestKit, state_dir: Path, **config: object) -> QemuVm:
    vm = QemuVm(VmConfig(**config), kit=kit)  # type: ignore[arg-type]
    vm.workdir = state_dir / vm.id
    return vm


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(guestkit: GuestKit, state_dir: Path) -> AsyncIterator[QemuVm]:
    machine = new_vm(guestkit, state_dir)
    await machine.start()
    yield machine
    await machine.stop(force=True)


async def test_timeout_kills_the_process_tree(vm: QemuVm) -> None:
    with pytest.raises(ExecTimeout) as info:
        await vm.exec(["sh", "-c", "sleep 100 & echo $!; wait"], timeout=1.5)
    child = info.value.stdout.decode().strip()
    assert child.isdigit()
    alive = await vm.exec(["sh", "-c", f"kill -0 {child}"])
    assert alive.exit_code != 0, "the background child survived the timeout"


async def test_commands_start_with_sigint_and_sigquit_at_default(vm: QemuVm) -> None:
    # init starts the first agent in the background, where sh ignores SIGINT and SIGQUIT;
    # a command must not inherit that (Ctrl-C and forwarded signals would do nothing)
    status = (await vm.exec(["cat", "/proc/self/status"])).stdout.decode()
    ignored = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn"))
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        assert not int(ignored, 16) & (1 << (signum - 1)), signum.name


async def test_garbage_frame_gets_an_error_and_the_next_exec_works(vm: QemuVm) -> None:
    assert vm.agent.client is not None
    await vm.agent.client._send(b"\x00garbage\xff" * 100)  # raw bytes past the client's framing
    result = await vm.exec(["echo", "still alive"])
    assert result.stdout == b"still alive\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_stop_cleans_up_every_process_and_socket(guestkit: GuestKit,
                                                       state_dir: Path) -> None:
    machine = new_vm(guestkit, state_dir)
    await machine.start()
    pid = machine.pid
    assert pid is not None and machine.agent_socket.exists() and machine.qmp_socket.exists()
    await machine.stop()
    assert machine.state is VmState.STOPPED and machine.crash_reason is None
    assert not _alive(pid)
    assert not machine.agent_socket.exists() and not machine.qmp_socket.exists()
    group = await asyncio.create_subprocess_exec(
        "pgrep", "-s", str(pid), stdout=asyncio.subprocess.PIPE
    )
    survivors, _ = await group.communicate()
    assert survivors == b"", "processes of the VM's session survived stop"


async def test_a_guest_that_never_answers_is_booted_twice_then_refused(
    guestkit: GuestKit, state_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    machine = QemuVm(VmConfig(), kit=guestkit, boot_timeout=0.2)  # no guest answers so fast
    machine.workdir = state_dir / machine.id
    with caplog.at_level(logging.WARNING, logger="kelpie"), \
            pytest.raises(BootError, match=r"timed out after 0.2s waiting for"):
        await machine.start()
    retried = [r for r in caplog.records if r.getMessage().endswith("(booting it again)")]
    assert len(retried) == 1, [r.getMessage() for r in caplog.records]
    assert machine.state is VmState.STOPPED
    assert not (machine.workdir / "qemu.pid").exists()


async def test_stop_grace_bounds_the_guest_shutdown(guestkit: GuestKit,
                                                     state_dir: Path) -> None:
    machine = new_vm(guestkit, state_dir)
    await machine.start()
    with pytest.raises(ConfigError, match="grace is -1"):
        await machine.stop(grace=-1)
    pid = machine.pid
    await machine.stop(grace=0.001)  # too short for the guest: QEMU is quit instead
    assert machine.state is VmState.STOPPED and machine.crash_reason is None
    assert pid is not None and not _alive(pid)


async def test_boot_failure_reports_console_tail(guestkit: GuestKit, state_dir: Path) -> None:
    machine = new_vm(guestkit, state_dir, kernel_args=("init=/nonexistent", "rdinit=/nope"))
    machine.boot_timeout = 30
    from kelpie import BootError

    with pytest.raises(BootError) as info:
        await machine.start()
    assert "console.log" in str(info.value) or "QEMU exited" in str(info.value)
    assert machine.state is VmState.STOPPED
    with contextlib.suppress(Exception):
        await machine.stop()


@pytest.fixture(scope="module")
def root_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ext4 root filesystem (static busybox) built with mke2fs -d, like an image."""
    import shutil

    tree = tmp_path_factory.mktemp("rootfs")
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
        (tree / d).mkdir()
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox-static is required (scripts/setup installs it)"
    shutil.copy(busybox, tree / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "ls", "ip", "mount"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "image-marker").write_text("from the root disk\n")
    image = tmp_path_factory.mktemp("disk") / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(image), "32M"],
                   check=True)
    return image


async def test_root_disk_share_and_nat(guestkit: GuestKit, state_dir: Path, root_disk: Path,
                                       tmp_path: Path) -> None:
    from kelpie import Mount, NetworkMode

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host data\n")
    machine = new_vm(
        guestkit, state_dir, root_disk=root_disk, network=NetworkMode.NAT,
        mounts=(Mount(shared, "/data"), Mount(shared, "/ro", read_only=True)),
    )
    base_digest = hashlib.sha256(root_disk.read_bytes()).hexdigest()
    await machine.start()
    try:
        wrote = await machine.exec(["sh", "-c", "echo changed > /root/new-file"])
        assert wrote.exit_code == 0
        marker = await machine.exec(["cat", "/etc/image-marker"])  # runs inside the disk's root
        assert marker.stdout == b"from the root disk\n"
        both = await machine.exec(["sh", "-c", "cat /data/from-host; echo guest > /data/back"])
        assert both.stdout == b"host data\n"
        assert (shared / "back").read_text() == "guest\n"
        denied = await machine.exec(["sh", "-c", "echo x > /ro/nope"])
        assert denied.exit_code != 0 and not (shared / "nope").exists()
        addr = await machine.exec(["ip", "-4", "addr", "show", "eth0"])
        assert b"10.0.2.15/24" in addr.stdout
    finally:
        await machine.stop()
    # the base image is untouched: the guest's writes went to the VM's own overlay
    assert hashlib.sha256(root_disk.read_bytes()).hexdigest() == base_digest
    assert (machine.workdir / "overlay.qcow2").exists()
