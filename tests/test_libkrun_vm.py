"""LibkrunVm's child-process lifecycle, driven through a stand-in libkrun (libkrun_standin).

The child process, the launch description, every ``krun_*`` call it makes, the agent
connection over libkrun's unix socket, stop, crash, attach and checkpoints run for real;
only the VMM is a stand-in, whose "guest" is the real agent run on the host in its own
namespaces, chrooted into a copy of a busybox root (see fake_guest.py).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_guest import scratch_root
from kelpie.backends import libkrun
from kelpie.backends.libkrun._kitroot import kit_root
from kelpie.backends.libkrun._launch import GUEST_ROOT, Share, guest_init_script
from kelpie.backends.libkrun._root import root_source
from kelpie.backends.libkrun._vm import LibkrunVm
from kelpie.guestkit import _cpio
from kelpie.vm import (
    BackendUnavailable,
    BootError,
    ConfigError,
    Mount,
    NetworkMode,
    SnapshotKind,
    UnsupportedOperation,
    VmConfig,
    VmSnapshot,
    VmState,
)
from libkrun_standin import build_standin, read_calls, standin_env


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    """A short directory (unix socket paths are limited) holding the stand-in and roots."""
    path = Path(tempfile.mkdtemp(prefix="lk-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def library(where: Path) -> Path:
    return build_standin(where)


@pytest.fixture(scope="module")
def image(where: Path) -> Path:
    """The image's root directory (never written: each VM gets a copy)."""
    return scratch_root(where / "image")


class Vms:
    """Makes LibkrunVms on the stand-in, each in its own short VM directory; stops them."""

    def __init__(self, where: Path, library: Path, image: Path) -> None:
        self.where, self.library, self.image = where, library, image
        self.made: list[LibkrunVm] = []

    def new(self, *, fail: str | None = None, **config: Any) -> LibkrunVm:
        config.setdefault("root_disk", self.image)
        vm = LibkrunVm(VmConfig(**config), library=str(self.library), kit_root=self.where,
                       vmm_env=standin_env(self.where / "calls.jsonl", fail))
        vm.workdir = self.where / vm.id
        self.made.append(vm)
        return vm

    def calls(self) -> list[dict[str, Any]]:
        return read_calls(self.where / "calls.jsonl")


@pytest.fixture
async def vms(where: Path, library: Path, image: Path) -> Any:
    (where / "calls.jsonl").unlink(missing_ok=True)
    made = Vms(where, library, image)
    yield made
    for vm in made.made:
        await vm.stop(force=True)


async def test_start_exec_files_and_stop(vms: Vms, image: Path) -> None:
    vm = vms.new(vcpus=3, memory_mib=640, env={"GREETING": "hi"})
    await vm.start()
    assert vm.state is VmState.RUNNING
    named = await vm.exec(["hostname"])  # named through the agent: libkrun has no call
    assert named.stdout == f"kelpie-{vm.id[:8]}\n".encode()
    result = await vm.exec(["sh", "-c", "echo $GREETING; exit 3"])
    assert (result.exit_code, result.stdout) == (3, b"hi\n")
    await vm.write_file("/workspace/note", b"kept")
    assert await vm.read_file("/workspace/note") == b"kept"
    assert not (image / "workspace" / "note").exists()  # the guest writes its own copy

    calls = {c["fn"]: c["args"] for c in vms.calls()}
    assert calls["krun_set_vm_config"] == [1, 3, 640]
    assert calls["krun_add_vsock"] == [1, 0]  # no TSI: no network through the host
    assert calls["krun_add_vsock_port2"] == [1, 1024, str(vm.agent_socket), 1]  # listen
    assert calls["krun_set_console_output"] == [1, str(vm.workdir / "console.log")]
    shell, (flag, script), env = calls["krun_set_exec"][1:]
    assert (shell, flag) == ("/bin/sh", "-c")
    assert f"agent.pyc --listen-vsock 1024 --root {GUEST_ROOT}" in script
    assert "GREETING=hi" in env
    shares = [c["args"][1:] for c in vms.calls() if c["fn"] == "krun_add_virtiofs3"]
    assert shares == [["/dev/root", str(vms.where), 0, 1],  # the kit's tree, read-only
                      ["kelpie-root", str(vm.workdir / "rootfs"), 0, 0]]
    assert [c["fn"] for c in vms.calls()][-1] == "krun_start_enter"

    pid = vm.pid
    await vm.stop()
    assert vm.state is VmState.STOPPED and vm.pid is None
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert not vm.agent_socket.exists()
    await vm.start()  # the VM's root is kept across stop and start, like a disk
    assert await vm.read_file("/workspace/note") == b"kept"


async def test_volumes_are_virtiofs_shares_mounted_below_the_vm_root(vms: Vms,
                                                                      tmp_path: Path) -> None:
    vm = vms.new(mounts=(Mount(tmp_path, "/data", read_only=True, tag="data"),))
    await vm.start()
    shares = [c["args"][1:] for c in vms.calls() if c["fn"] == "krun_add_virtiofs3"]
    assert ["data", str(tmp_path), 0, 1] in shares
    script = next(c["args"][2][1] for c in vms.calls() if c["fn"] == "krun_set_exec")
    assert f"mount -t virtiofs -o ro data {GUEST_ROOT}/data" in script


def test_the_guest_init_script_is_valid_shell() -> None:
    script = guest_init_script([Share("v0", "/h", "/with space", False)])
    subprocess.run(["sh", "-n", "-c", script], check=True)
    assert "'/run/kelpie/root/with space'" in script


async def test_a_missing_library_is_a_clear_error(vms: Vms, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("KELPIE_LIBKRUN", str(tmp_path / "absent.so"))
    vm = LibkrunVm(VmConfig(), kit_root=tmp_path, workdir=tmp_path / "vm")
    with pytest.raises(BackendUnavailable, match=r"KELPIE_LIBKRUN=.*absent\.so is not a file"):
        await vm.start()
    assert vm.state is VmState.STOPPED
    libkrun.probe.cache_clear()
    try:
        found = libkrun.probe()
    finally:
        libkrun.probe.cache_clear()
    assert not found.available and "KELPIE_LIBKRUN" in found.reason


async def test_a_failed_krun_call_is_a_boot_error_quoting_it(vms: Vms) -> None:
    vm = vms.new(fail="krun_add_vsock_port2")
    with pytest.raises(BootError, match=r"(?s)libkrun exited with status 2.*"
                                        r"krun_add_vsock_port2 failed: Invalid argument"):
        await vm.start()
    assert vm.state is VmState.STOPPED


async def test_the_childs_death_marks_the_vm_crashed(vms: Vms) -> None:
    vm = vms.new()
    await vm.start()
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    await _until_crashed(vm)
    assert vm.crash_reason is not None and f"status -{signal.SIGKILL}" in vm.crash_reason


async def _until_crashed(vm: LibkrunVm) -> None:
    """Wait (up to 5 s) for the VM's watcher to see its child's death."""
    crashed = asyncio.Event()
    vm.observe(lambda _vm, _old, new: crashed.set() if new is VmState.CRASHED else None)
    if vm.state is not VmState.CRASHED:
        async with asyncio.timeout(5):
            await crashed.wait()


async def test_pause_and_full_or_disk_snapshots_are_unsupported(vms: Vms,
                                                                tmp_path: Path) -> None:
    vm = vms.new()
    await vm.start()
    with pytest.raises(UnsupportedOperation, match="libkrun has no pause, snapshot or restore"):
        await vm.pause()
    with pytest.raises(UnsupportedOperation, match=r"full snapshots \(libkrun has no pause"):
        await vm.snapshot(tmp_path / "full")
    await vm.stop()
    with pytest.raises(UnsupportedOperation, match="disk snapshots"):
        await vm.snapshot(tmp_path / "disk", kind=SnapshotKind.DISK)


async def test_checkpoint_round_trip(vms: Vms, tmp_path: Path, image: Path) -> None:
    vm = vms.new()
    await vm.start()
    await vm.mkdir("/workspace/deep")
    await vm.write_file("/workspace/deep/data.bin", bytes(range(256)) * 40, mode=0o640)
    await vm.write_file("/scratch", b"outside the workspace")
    snapshot = await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    assert vm.state is VmState.RUNNING
    await vm.stop()

    with pytest.raises(UnsupportedOperation, match="left paused"):
        await vm.restore(VmSnapshot.open(snapshot.path), paused=True)
    assert await _root_has(vm, "scratch")  # a refused restore keeps the VM's root

    await vm.restore(VmSnapshot.open(snapshot.path))
    assert vm.state is VmState.RUNNING
    assert await vm.read_file("/workspace/deep/data.bin") == bytes(range(256)) * 40
    modes = {e.name: e.mode for e in await vm.list_dir("/workspace/deep")}
    assert modes == {"data.bin": 0o640}
    assert not await _root_has(vm, "scratch")  # booted fresh from the image
    assert not (image / "workspace" / "deep").exists()


async def _root_has(vm: LibkrunVm, name: str) -> bool:
    return (vm.workdir / "rootfs" / name).exists()


def test_network_nat_and_policy_are_refused() -> None:
    with pytest.raises(ConfigError, match="libkrun runs VMs without a network"):
        LibkrunVm(VmConfig(network=NetworkMode.NAT))
    with pytest.raises(ConfigError, match="cannot enforce egress rules"):
        LibkrunVm(VmConfig(network=NetworkMode.POLICY))
    assert not libkrun.CAPABILITIES.networking and not libkrun.CAPABILITIES.egress_policy


async def test_attach_finds_the_child_and_a_dead_one_is_crashed(vms: Vms) -> None:
    vm = vms.new()
    await vm.start()
    await vm.exec(["sh", "-c", "echo held"])
    await vm.detach()
    again = await LibkrunVm.attach(vm.id, workdir=vm.workdir)
    vms.made.append(again)
    assert again.state is VmState.RUNNING and again.pid is not None
    assert (await again.exec(["echo", "back"])).stdout == b"back\n"
    os.kill(again.pid, signal.SIGKILL)
    await _until_crashed(again)
    dead = await LibkrunVm.attach(vm.id, workdir=vm.workdir)
    assert dead.state is VmState.CRASHED
    assert dead.crash_reason is not None and "no longer running" in dead.crash_reason


def test_the_root_comes_from_a_directory_or_the_image_stores_one(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    assert root_source(None, kit) == kit  # no image: the kit's own userland, as under QEMU
    assert root_source(tmp_path, kit) == tmp_path
    (tmp_path / "store" / "ext4").mkdir(parents=True)
    (tmp_path / "store" / "rootfs" / "ab12").mkdir(parents=True)
    disk = tmp_path / "store" / "ext4" / "ab12.ext4"
    disk.write_bytes(b"")
    assert root_source(disk, kit) == tmp_path / "store" / "rootfs" / "ab12"
    lone = tmp_path / "root.ext4"
    lone.write_bytes(b"")
    with pytest.raises(ConfigError, match="give root_disk as a directory"):
        root_source(lone, kit)
    with pytest.raises(BootError, match="does not exist"):
        root_source(tmp_path / "absent.ext4", kit)


def test_the_kits_initramfs_unpacks_to_a_directory(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    (stage / "kelpie" / "guest").mkdir(parents=True)
    (stage / "kelpie" / "guest" / "agent.py").write_text("print('agent')\n")
    (stage / "bin").mkdir()
    (stage / "bin" / "busybox").write_bytes(b"\x7fELF")
    (stage / "bin" / "busybox").chmod(0o755)
    (stage / "bin" / "sh").symlink_to("busybox")
    archive = io.BytesIO()
    _cpio.write_archive(archive, [*_cpio.tree_entries(stage),
                                  _cpio.char_device("dev/console", 5, 1)])
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "initrd").write_bytes(archive.getvalue())
    tree = kit_root(kit / "initrd")
    assert tree == kit / "libkrun-root"
    assert (tree / "kelpie" / "guest" / "agent.py").read_text() == "print('agent')\n"
    assert os.readlink(tree / "bin" / "sh") == "busybox"
    assert (tree / "bin" / "busybox").stat().st_mode & 0o777 == 0o755
    assert not (tree / "dev" / "console").exists()  # the guest's /dev is a devtmpfs
    shutil.rmtree(stage)
    assert kit_root(kit / "initrd") == tree  # unpacked once
