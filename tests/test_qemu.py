"""Real VMs under QEMU (TCG here): every test boots a real guest and runs real commands.

These fail instead of skipping when KELPIE_REQUIRE_VM=1 (CI) and no VM can boot.
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
    GuestFileError,
    InvalidStateError,
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
    machine = new_vm(guestkit, state_dir, env={"FROM_CONFIG": "yes"})
    await machine.start()
    yield machine
    await machine.stop(force=True)


async def test_echo(vm: QemuVm) -> None:
    result = await vm.exec(["echo", "hello"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"hello\n", b"")


async def test_exit_codes_and_stderr(vm: QemuVm) -> None:
    result = await vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    missing = await vm.exec(["no-such-program"])
    assert missing.exit_code == 127 and b"command not found" in missing.stderr


async def test_env_and_cwd(vm: QemuVm) -> None:
    result = await vm.exec(["sh", "-c", "echo $FROM_CONFIG $EXTRA; pwd"], env={"EXTRA": "x y"},
                           cwd="/tmp")
    assert result.stdout == b"yes x y\n/tmp\n"


async def test_stdin(vm: QemuVm) -> None:
    result = await vm.exec(["sh", "-c", "cat | tr a-z A-Z"], stdin=b"piped text\n")
    assert result.stdout == b"PIPED TEXT\n"


async def test_8_mib_of_output_intact(vm: QemuVm) -> None:
    await vm.exec(["dd", "if=/dev/urandom", "of=/tmp/big", "bs=1M", "count=8"])
    output = await vm.exec(["cat", "/tmp/big"])
    digest = await vm.exec(["sha256sum", "/tmp/big"])
    assert len(output.stdout) == 8 * 1024 * 1024
    assert hashlib.sha256(output.stdout).hexdigest() == digest.stdout.split()[0].decode()


async def test_timeout_kills_the_process_tree(vm: QemuVm) -> None:
    with pytest.raises(ExecTimeout) as info:
        await vm.exec(["sh", "-c", "sleep 100 & echo $!; wait"], timeout=1.5)
    child = info.value.stdout.decode().strip()
    assert child.isdigit()
    alive = await vm.exec(["sh", "-c", f"kill -0 {child}"])
    assert alive.exit_code != 0, "the background child survived the timeout"


async def test_32_concurrent_execs(vm: QemuVm) -> None:
    results = await asyncio.gather(
        *(vm.exec(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(32))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(32)]


async def test_16_mib_file_round_trip(vm: QemuVm) -> None:
    data = os.urandom(16 * 1024 * 1024)
    await vm.write_file("/tmp/upload", data, mode=0o640)
    guest_sum = await vm.exec(["sha256sum", "/tmp/upload"])
    assert guest_sum.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert await vm.read_file("/tmp/upload") == data
    entries = {e.name: e for e in await vm.list_dir("/tmp")}
    assert entries["upload"].mode == 0o640 and entries["upload"].size == len(data)
    await vm.remove("/tmp/upload")
    with pytest.raises(GuestFileError) as info:
        await vm.read_file("/tmp/upload")
    assert info.value.code == "ENOENT"


async def test_streaming_exec_and_signal(vm: QemuVm) -> None:
    async with vm.exec_stream(["sh", "-c", "echo ready; exec sleep 100"]) as proc:
        async for event in proc:
            assert getattr(event, "data", b"") == b"ready\n"
            break
        await proc.send_signal(signal.SIGTERM)
        result = await proc.wait()
    assert result.signal == signal.SIGTERM and result.exit_code == 128 + signal.SIGTERM


async def test_pause_stops_guest_progress(vm: QemuVm) -> None:
    counter = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
    async with vm.exec_stream(["sh", "-c", counter]):
        async def count() -> int:
            out = (await vm.exec(["cat", "/tmp/count"])).stdout.strip()
            return int(out or b"0")

        await asyncio.sleep(0.5)
        before = await count()
        await vm.pause()
        assert vm.state is VmState.PAUSED
        with pytest.raises(InvalidStateError):
            await vm.exec(["true"])
        await asyncio.sleep(1.5)  # 30 loop iterations would run if the guest were not paused
        await vm.resume()
        after_pause = await count()
        assert after_pause - before < 15, (before, after_pause)
        await asyncio.sleep(1.0)
        assert await count() > after_pause  # resume continues


async def test_garbage_frame_gets_an_error_and_the_next_exec_works(vm: QemuVm) -> None:
    assert vm._agent is not None
    await vm._agent._send(b"\x00garbage\xff" * 100)  # raw bytes past the client's framing
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


async def test_killed_qemu_marks_the_vm_crashed(guestkit: GuestKit, state_dir: Path) -> None:
    machine = new_vm(guestkit, state_dir)
    await machine.start()
    crashed = asyncio.Event()
    machine.observe(lambda _vm, _old, new: crashed.set() if new is VmState.CRASHED else None)
    assert machine.pid is not None
    os.kill(machine.pid, signal.SIGKILL)
    await asyncio.wait_for(crashed.wait(), 30)
    assert machine.state is VmState.CRASHED
    assert machine.crash_reason is not None and "status -9" in machine.crash_reason
    with pytest.raises(InvalidStateError):
        await machine.exec(["true"])
    await machine.stop()
    assert machine.state is VmState.STOPPED


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


async def test_pty_exec_with_resize(vm: QemuVm) -> None:
    async with vm.exec_stream(["sh", "-c", "tty; read go; stty size"], pty=True) as proc:
        await proc.resize(30, 100)
        await proc.write_stdin(b"go\n")
        result = await proc.wait()
    output = result.stdout.replace(b"\r\n", b"\n")
    assert result.exit_code == 0
    assert b"/dev/pts/" in output and b"30 100\n" in output


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
