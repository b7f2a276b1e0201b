"""Checkpoints of real QEMU VMs: the workspace, env and agent state, restored into new VMs.

One source VM (a busybox root disk) gets a small workspace and is checkpointed once; the
tests restore that checkpoint into new VMs, also with a manifest that claims another
architecture and backend, and back into the source VM itself. These fail instead of
skipping when qemu is in KELPIE_REQUIRE_BACKENDS (CI) and no VM can boot.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie import MockVm, SnapshotKind, VmConfig, VmSnapshot, VmState
from kelpie.backends.qemu import CAPABILITIES
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit
from kelpie.vm._checkpoint import AGENT_STATE_BLOB, RECORD_KEY, WORKSPACE_BLOB, read_checkpoint
from vm_fixtures import busybox_root_disk, short_state_dir

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

ENV = {"GREETING": "hello from the checkpoint"}
SCRIPT = b"#!/bin/sh\necho ran from the workspace\n"
DATA = bytes(range(256)) * 300  # 75 KiB: more than one transfer chunk
EXPECTED_MODES = {
    "src": ("dir", 0o755),
    "src/run.sh": ("file", 0o755),
    "src/deep": ("dir", 0o755),
    "src/deep/data.bin": ("file", 0o644),
    "private": ("dir", 0o700),
    "private/key": ("file", 0o600),
    "run": ("symlink", 0o777),
}


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from short_state_dir("cp")


@pytest.fixture(scope="module")
def root_disk(state_dir: Path) -> Path:
    """A small ext4 root filesystem with static busybox (no /workspace in it)."""
    return busybox_root_disk(state_dir)


def new_vm(kit: GuestKit, state_dir: Path, root_disk: Path, **config: object) -> QemuVm:
    vm = QemuVm(VmConfig(root_disk=root_disk, **config), kit=kit)  # type: ignore[arg-type]
    vm.workdir = state_dir / vm.id
    return vm


async def sh(vm: QemuVm, script: str) -> str:
    result = await vm.exec(["sh", "-c", script])
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def source(guestkit: GuestKit, state_dir: Path, root_disk: Path) -> AsyncIterator[QemuVm]:
    vm = new_vm(guestkit, state_dir, root_disk, env=ENV)
    await vm.start()
    await sh(vm, "mkdir -p /workspace/src/deep /workspace/private && chmod 700 "
                 "/workspace/private")
    await vm.write_file("/workspace/src/run.sh", SCRIPT, mode=0o755)
    await vm.write_file("/workspace/src/deep/data.bin", DATA)
    await vm.write_file("/workspace/private/key", b"secret\n", mode=0o600)
    await sh(vm, "cd /workspace && ln -s src/run.sh run && ln -s /etc/passwd passwd && "
                 "mkfifo pipe && mknod null c 1 3")
    await sh(vm, "echo outside > /root/outside")  # not in the workspace: not carried
    yield vm
    await vm.stop(force=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def checkpoint(source: QemuVm, state_dir: Path) -> VmSnapshot:
    return await source.snapshot(state_dir / "cp", kind=SnapshotKind.CHECKPOINT)


async def workspace_modes(vm: QemuVm, directory: str = "/workspace",
                          prefix: str = "") -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for info in await vm.list_dir(directory):
        rel = f"{prefix}{info.name}"
        found[rel] = (info.type, info.mode)
        if info.type == "dir":
            found.update(await workspace_modes(vm, f"{directory}/{info.name}", f"{rel}/"))
    return found


async def assert_restored(vm: QemuVm) -> None:
    assert vm.state is VmState.RUNNING
    assert await workspace_modes(vm) == EXPECTED_MODES
    assert await vm.read_file("/workspace/src/run.sh") == SCRIPT
    assert await vm.read_file("/workspace/src/deep/data.bin") == DATA
    assert await vm.read_file("/workspace/private/key") == b"secret\n"
    assert await sh(vm, "readlink /workspace/run") == "src/run.sh\n"
    assert await sh(vm, "/workspace/run") == "ran from the workspace\n"  # via the link
    assert await sh(vm, "echo $GREETING") == ENV["GREETING"] + "\n"
    assert (await vm.exec(["cat", "/root/outside"])).exit_code != 0
    assert (await sh(vm, "hostname")).strip() == f"kelpie-{vm.id[:8]}"  # its own identity


async def test_capabilities() -> None:
    assert SnapshotKind.CHECKPOINT in CAPABILITIES.snapshot_kinds


async def test_checkpoint_of_a_running_vm(source: QemuVm, checkpoint: VmSnapshot) -> None:
    manifest = checkpoint.manifest
    assert manifest.kind is SnapshotKind.CHECKPOINT
    assert (manifest.backend, manifest.arch) == ("qemu", "x86_64")
    assert source.state is VmState.RUNNING  # never paused: the agent did the reading
    record = manifest.extra[RECORD_KEY]
    assert (record["workspace"], record["dirs"], record["files"], record["symlinks"]) == (
        "/workspace", 3, 3, 1)
    skipped = {s["path"]: s["reason"] for s in record["skipped"]}
    assert set(skipped) == {"passwd", "pipe", "null"}
    assert "leaves the workspace" in skipped["passwd"]
    assert "a fifo" in skipped["pipe"] and "a char" in skipped["null"]
    state = json.loads(checkpoint.read_blob(AGENT_STATE_BLOB))
    assert state["hostname"] == f"kelpie-{source.id[:8]}"
    names = [e.path for e in read_checkpoint(checkpoint).entries]
    assert sorted(names) == ["private", "private/key", "run", "src", "src/deep",
                             "src/deep/data.bin", "src/run.sh"]
    assert manifest.blobs[WORKSPACE_BLOB].size > len(DATA)
    checkpoint.verify()


async def test_restore_into_a_new_vm(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, checkpoint: VmSnapshot
) -> None:
    vm = new_vm(guestkit, state_dir, root_disk)
    try:
        await vm.restore(VmSnapshot.open(checkpoint.path))
        await assert_restored(vm)
        assert vm.config.env == ENV  # and kept in its record, for attach
        record = json.loads((vm.workdir / "config.json").read_text())
        assert record["config"]["env"] == ENV
    finally:
        await vm.stop(force=True)


async def test_checkpoint_claiming_another_arch_and_backend_restores(
    guestkit: GuestKit, state_dir: Path, root_disk: Path, checkpoint: VmSnapshot
) -> None:
    copy = state_dir / "other-arch"
    shutil.copytree(checkpoint.path, copy)
    claimed = dataclasses.replace(checkpoint.manifest, arch="aarch64", backend="vz",
                                  backend_version="1.0", cpu_model="apple-m2", machine="vz")
    (copy / "manifest.json").write_bytes(claimed.to_json())  # a valid manifest, checksum too
    vm = new_vm(guestkit, state_dir, root_disk)
    try:
        await vm.restore(VmSnapshot.open(copy))
        await assert_restored(vm)
    finally:
        await vm.stop(force=True)


async def test_checkpoint_from_the_mock_restores_into_qemu(
    guestkit: GuestKit, state_dir: Path, root_disk: Path
) -> None:
    mock = MockVm(VmConfig(env={"FROM": "mock"}), file_checkpoints=True)
    await mock.start()
    await mock.exec(["mkdir", "-p", "/workspace/notes"])
    await mock.write_file("/workspace/notes/todo", b"teleport me\n", mode=0o640)
    snapshot = await mock.snapshot(state_dir / "from-mock", kind=SnapshotKind.CHECKPOINT)
    vm = new_vm(guestkit, state_dir, root_disk)
    try:
        await vm.restore(VmSnapshot.open(snapshot.path), paused=True)
        assert vm.state is VmState.PAUSED
        await vm.resume()
        assert await vm.read_file("/workspace/notes/todo") == b"teleport me\n"
        assert await workspace_modes(vm) == {"notes": ("dir", 0o755),
                                             "notes/todo": ("file", 0o640)}
        assert await sh(vm, "echo $FROM") == "mock\n"
    finally:
        await vm.stop(force=True)


async def test_restore_in_place_boots_fresh(
    source: QemuVm, checkpoint: VmSnapshot
) -> None:
    await sh(source, "echo stale > /workspace/stale; rm /workspace/src/run.sh")
    await source.stop()
    await source.restore(VmSnapshot.open(checkpoint.path))
    try:
        await assert_restored(source)  # /root/outside is gone too: the disk started fresh
        assert (await source.exec(["cat", "/workspace/stale"])).exit_code != 0
        assert not (source.workdir / ".overlay.qcow2.before-restore").exists()
    finally:
        await source.stop(force=True)
