"""Checkpoints through the file hooks (kelpie.vm._checkpoint), on the mock and a small fake.

The mock takes them with ``file_checkpoints=True`` (the generic path every backend with
the file hooks uses); a subclass adds the symbolic links the mock guest lacks. Hostile
workspace archives are refused before anything boots, naming the unsafe entry.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kelpie import (
    ConfigError,
    InvalidStateError,
    MockVm,
    Mount,
    SnapshotCorrupted,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotKind,
    SnapshotTooLarge,
    VmConfig,
    VmSnapshot,
    VmState,
)
from kelpie.vm import FileInfo, GuestFileError, SnapshotWriter
from kelpie.vm._checkpoint import (
    AGENT_STATE_BLOB,
    ENV_BLOB,
    RECORD_KEY,
    WORKSPACE_BLOB,
    CheckpointEntry,
    link_problem,
    pack_workspace,
    read_checkpoint,
    unpack_workspace,
)


class LinkingMockVm(MockVm):
    """A mock whose guest also has symbolic links (the mock's own file system has none)."""

    def __init__(self, config: VmConfig, **options: Any) -> None:
        super().__init__(config, **options)
        self.links: dict[str, str] = {}

    async def _boot(self, operation: str) -> None:
        await super()._boot(operation)
        self.links = {}  # a fresh guest

    async def _do_list_dir(self, path: str) -> list[FileInfo]:
        infos = await super()._do_list_dir(path)
        prefix = path.rstrip("/") + "/"
        infos += [
            FileInfo(p[len(prefix):], "symlink", len(t), 0o777)
            for p, t in self.links.items()
            if p.startswith(prefix) and "/" not in p[len(prefix):]
        ]
        return sorted(infos, key=lambda i: i.name)

    async def _do_readlink(self, path: str) -> str:
        if path not in self.links:
            raise GuestFileError(path, "EINVAL", "not a symbolic link")
        return self.links[path]

    async def _do_symlink(self, target: str, path: str) -> None:
        if path in self.links or path in self.fs.files or self.fs.is_dir(path):
            raise GuestFileError(path, "EEXIST", "exists")
        self.links[path] = target

    async def _do_remove(self, path: str, recursive: bool) -> None:
        if path in self.links:
            del self.links[path]
            return
        await super()._do_remove(path, recursive)
        self.links = {p: t for p, t in self.links.items() if not p.startswith(path + "/")}


async def workspace_vm(**options: Any) -> MockVm:
    """A running mock (generic checkpoints) with a small workspace and a file outside it."""
    config = options.pop("config", VmConfig(env={"GREETING": "hello", "SHARED": "source"}))
    cls = options.pop("cls", MockVm)
    vm = cls(config, file_checkpoints=True, **options)
    await vm.start()
    await vm.exec(["mkdir", "-p", "/workspace/src/deep"])
    await vm._do_mkdir("/workspace/private", 0o700)
    await vm.write_file("/workspace/src/run.sh", b"#!/bin/sh\necho run\n", mode=0o755)
    await vm.write_file("/workspace/src/deep/data.bin", bytes(range(256)) * 10, mode=0o600)
    await vm.write_file("/workspace/private/key", b"secret", mode=0o400)
    await vm.write_file("/workspace/empty", b"")
    await vm.write_file("/tmp/outside", b"not in the workspace")
    return vm


def tree(vm: MockVm, root: str = "/workspace") -> dict[str, tuple[str, int, bytes]]:
    """Everything below ``root`` in a mock guest: path -> (type, mode, content)."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for path, mode in vm.fs.dirs.items():
        if path.startswith(root + "/"):
            out[path] = ("dir", mode, b"")
    for path, (data, mode) in vm.fs.files.items():
        if path.startswith(root + "/"):
            out[path] = ("file", mode, data)
    for path, target in getattr(vm, "links", {}).items():
        if path.startswith(root + "/"):
            out[path] = ("symlink", 0o777, target.encode())
    return out


async def test_checkpoint_round_trip_through_the_file_hooks(tmp_path: Path) -> None:
    source = await workspace_vm()
    snapshot = await source.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    assert source.state is VmState.RUNNING
    manifest = snapshot.manifest
    assert manifest.kind is SnapshotKind.CHECKPOINT
    assert sorted(manifest.blobs) == sorted([WORKSPACE_BLOB, ENV_BLOB, AGENT_STATE_BLOB])
    record = manifest.extra[RECORD_KEY]
    assert (record["workspace"], record["dirs"], record["files"], record["symlinks"]) == (
        "/workspace", 3, 4, 0)
    assert record["file_bytes"] == len(b"#!/bin/sh\necho run\n") + 2560 + 6
    assert record["skipped"] == [] and record["skipped_count"] == 0
    snapshot.verify()

    target = MockVm(VmConfig(env={"SHARED": "target"}))  # a native-format mock restores it
    await target.restore(VmSnapshot.open(snapshot.path))
    assert target.state is VmState.RUNNING
    assert tree(target) == tree(source)
    assert tree(target)["/workspace/private"] == ("dir", 0o700, b"")
    assert tree(target)["/workspace/src/run.sh"][:2] == ("file", 0o755)
    assert tree(target)["/workspace/private/key"] == ("file", 0o400, b"secret")
    assert "/tmp/outside" not in target.fs.files  # only the workspace travels
    env = (await target.exec(["env"])).stdout.decode().splitlines()
    assert "GREETING=hello" in env  # the checkpoint's env...
    assert "SHARED=target" in env  # ...under the restoring VM's own
    assert target.boots == 1  # a fresh boot, then the files


async def test_agent_state_is_carried_as_it_is(tmp_path: Path) -> None:
    source = await workspace_vm(config=VmConfig(hostname="box"))
    snapshot = await source.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    state = json.loads(snapshot.read_blob(AGENT_STATE_BLOB))
    assert state["hostname"] == "box"
    assert read_checkpoint(snapshot).agent_state == snapshot.read_blob(AGENT_STATE_BLOB)


async def test_checkpoint_of_another_arch_and_backend_restores(tmp_path: Path) -> None:
    source = await workspace_vm()
    snapshot = await source.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    claimed = dataclasses.replace(snapshot.manifest, arch="aarch64", backend="vz",
                                  backend_version="99", cpu_model="apple-m2", machine="vz")
    (snapshot.path / "manifest.json").write_bytes(claimed.to_json())
    target = MockVm(VmConfig())
    await target.restore(VmSnapshot.open(snapshot.path))
    assert tree(target) == tree(source)


async def test_native_mock_checkpoint_is_only_for_the_mock(tmp_path: Path) -> None:
    source = MockVm(VmConfig())  # native format: the mock's whole file system
    await source.start()
    snapshot = await source.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    with pytest.raises(SnapshotIncompatible, match="mock backend's own format"):
        read_checkpoint(snapshot)
    target = MockVm(VmConfig(), file_checkpoints=True)
    await target.restore(snapshot)  # the mock itself still reads its own format
    assert target.state is VmState.RUNNING


async def test_missing_workspace_is_a_clear_error(tmp_path: Path) -> None:
    vm = MockVm(VmConfig(), file_checkpoints=True)
    await vm.start()
    with pytest.raises(SnapshotError, match=r"workspace /workspace is not a directory.*"
                                            r"checkpoint_workspace"):
        await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    assert not list(tmp_path.iterdir())
    vm.checkpoint_workspace = "/"
    with pytest.raises(ConfigError, match="whole guest system"):
        await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    vm.checkpoint_workspace = "/home/../tmp"
    with pytest.raises(ConfigError, match="not normalised"):
        await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)


async def test_checkpoint_workspace_chooses_the_directory(tmp_path: Path) -> None:
    source = MockVm(VmConfig(), file_checkpoints=True)
    await source.start()
    await source.exec(["mkdir", "-p", "/home/agent/proj"])
    await source.write_file("/home/agent/proj/notes", b"n")
    source.checkpoint_workspace = "/home/agent"
    snapshot = await source.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    assert snapshot.manifest.extra[RECORD_KEY]["workspace"] == "/home/agent"
    back = MockVm(VmConfig())  # restores where it was taken by default
    await back.restore(snapshot)
    assert back.fs.read("/home/agent/proj/notes") == b"n"
    moved = MockVm(VmConfig())
    moved.checkpoint_workspace = "/srv/work"  # ...or where the restoring VM says
    await moved.restore(snapshot)
    assert moved.fs.read("/srv/work/proj/notes") == b"n"
    assert "/home/agent/proj/notes" not in moved.fs.files


async def test_checkpoint_needs_a_running_guest(tmp_path: Path) -> None:
    vm = await workspace_vm()
    await vm.pause()
    with pytest.raises(InvalidStateError, match="take a checkpoint"):
        await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    assert vm.state is VmState.PAUSED


async def test_checkpoint_size_limit(tmp_path: Path) -> None:
    vm = await workspace_vm(max_snapshot_bytes=2000)
    with pytest.raises(SnapshotTooLarge):
        await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    assert not list(tmp_path.iterdir())
    assert vm.state is VmState.RUNNING


async def test_symlinks_kept_inside_and_left_out_when_escaping(tmp_path: Path) -> None:
    source = await workspace_vm(cls=LinkingMockVm)
    assert isinstance(source, LinkingMockVm)
    source.links.update({
        "/workspace/run": "src/run.sh",
        "/workspace/src/deep/up": "../../empty",
        "/workspace/etc": "/etc",
        "/workspace/src/out": "../../tmp/outside",
    })
    snapshot = await source.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    record = snapshot.manifest.extra[RECORD_KEY]
    assert record["symlinks"] == 2
    assert {s["path"] for s in record["skipped"]} == {"etc", "src/out"}
    assert any("leaves the workspace" in s["reason"] for s in record["skipped"])
    target = LinkingMockVm(VmConfig())
    await target.restore(snapshot)
    assert target.links == {"/workspace/run": "src/run.sh",
                            "/workspace/src/deep/up": "../../empty"}
    assert target.fs.read("/workspace/src/run.sh") == b"#!/bin/sh\necho run\n"


async def test_restore_empties_the_workspace_but_not_shares(tmp_path: Path) -> None:
    source = await workspace_vm()
    snapshot = await source.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    host_dir = tmp_path / "share"
    host_dir.mkdir()
    config = VmConfig(mounts=(Mount(host_dir, "/workspace/shared"),))
    target = MockVm(config)
    await target.start()
    await target.exec(["mkdir", "-p", "/workspace/shared/sub", "/workspace/old"])
    await target.write_file("/workspace/shared/sub/host-file", b"host")
    await target.write_file("/workspace/old/stale", b"stale")
    await target.stop()
    # The mock boots a fresh file system; put the old one back to see what is emptied.
    old_fs = target.fs

    class Keeping(MockVm):
        async def _restore_file_checkpoint(self, snap: VmSnapshot, *, paused: bool) -> None:
            from kelpie.vm._checkpoint import replay_checkpoint

            await self._boot("restore")
            self.fs = old_fs
            await replay_checkpoint(self, read_checkpoint(snap))

    keeping = Keeping(config)
    await keeping.restore(snapshot)
    assert "/workspace/old/stale" not in keeping.fs.files
    assert keeping.fs.read("/workspace/shared/sub/host-file") == b"host"
    assert keeping.fs.read("/workspace/src/run.sh") == b"#!/bin/sh\necho run\n"

    shared_root = MockVm(VmConfig(mounts=(Mount(host_dir, "/workspace"),)))
    with pytest.raises(SnapshotIncompatible, match="shared directory /workspace"):
        await shared_root.restore(snapshot)


async def test_shared_directories_are_not_captured(tmp_path: Path) -> None:
    host_dir = tmp_path / "share"
    host_dir.mkdir()
    vm = await workspace_vm(config=VmConfig(mounts=(Mount(host_dir, "/workspace/src"),)))
    snapshot = await vm.snapshot(tmp_path / "cp", kind=SnapshotKind.CHECKPOINT)
    record = snapshot.manifest.extra[RECORD_KEY]
    assert record["skipped"] == [{"path": "src",
                                  "reason": "a shared directory (mount), not guest state"}]
    names = [e.path for e in read_checkpoint(snapshot).entries]
    assert names == ["empty", "private", "private/key"]


# ---- hostile archives ------------------------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "",
           mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    return info, data


def raw_tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buffer.getvalue()


DIR = tarfile.DIRTYPE
HOSTILE = {
    "absolute": ([member("/etc/passwd", data=b"x")], "'/etc/passwd'.*absolute name"),
    "dotdot": ([member("../escape", data=b"x")], r"'\.\./escape'.*'\.\.' in the name"),
    "dotdot inside": ([member("a", DIR), member("a/../../x", data=b"x")],
                      r"'\.\.' in the name"),
    "dot component": ([member("./a", data=b"x")], "not a canonical relative name"),
    "duplicate": ([member("a", data=b"1"), member("a", data=b"2")], "appears twice"),
    "before its directory": ([member("d/f", data=b"x")], r"before its directory \('d'\)"),
    "below a symlink": ([member("l", tarfile.SYMTYPE, link="sub"), member("l/f", data=b"x")],
                        "below a non-directory"),
    "below a file": ([member("f", data=b"x"), member("f/g", data=b"x")],
                     "below a non-directory"),
    "hard link": ([member("a", data=b"x"), member("b", tarfile.LNKTYPE, link="a")],
                  "hard link"),
    "hard link out": ([member("b", tarfile.LNKTYPE, link="/etc/shadow")], "hard link"),
    "char device": ([member("null", tarfile.CHRTYPE)], "a device node"),
    "block device": ([member("sda", tarfile.BLKTYPE)], "a device node"),
    "fifo": ([member("pipe", tarfile.FIFOTYPE)], "a FIFO"),
    "absolute link": ([member("l", tarfile.SYMTYPE, link="/etc")], "absolute target"),
    "escaping link": ([member("d", DIR), member("d/l", tarfile.SYMTYPE, link="../../x")],
                      "climbs above the workspace"),
    "dotdot after a name": ([member("a", tarfile.SYMTYPE, link="."),
                             member("l", tarfile.SYMTYPE, link="a/..")], "after a name"),
    "empty link": ([member("l", tarfile.SYMTYPE, link="")], "not a valid link target"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_entries_are_refused(case: str) -> None:
    members, message = HOSTILE[case]
    with pytest.raises(SnapshotCorrupted, match=f"unsafe entry .*{message}"):
        unpack_workspace(raw_tar(*members))


def test_gnu_long_names_and_plain_ustar_are_checked_too() -> None:
    long_escape = "../" * 60 + "etc/passwd"
    with pytest.raises(SnapshotCorrupted, match=r"'\.\.' in the name"):
        unpack_workspace(raw_tar(member(long_escape, data=b"x"), fmt=tarfile.GNU_FORMAT))
    ok = unpack_workspace(raw_tar(member("d", DIR), member("d/f", data=b"x"),
                                  fmt=tarfile.USTAR_FORMAT))
    assert [(e.path, e.type) for e in ok] == [("d", "dir"), ("d/f", "file")]


def test_not_a_tar_is_corrupted() -> None:
    with pytest.raises(SnapshotCorrupted, match="not a valid tar"):
        unpack_workspace(b"\x1f\x8b compressed or garbage" * 40)


@pytest.mark.parametrize(
    "path,target,ok",
    [
        ("l", "f", True),
        ("l", "./d/f", True),
        ("bin/x", "../lib/x", True),
        ("a/b/c", "../../d", True),
        ("a/b/c", "../../../d", False),
        ("l", "..", False),
        ("l", "/usr/bin/python3", False),
        ("l", "d/../f", False),
        ("l", "x\0y", False),
    ],
)
def test_link_rules(path: str, target: str, ok: bool) -> None:
    assert (link_problem(path, target) is None) is ok


def test_pack_and_unpack_agree() -> None:
    entries = [
        CheckpointEntry("d", "dir", 0o750),
        CheckpointEntry("d/f", "file", 0o640, b"data"),
        CheckpointEntry("d/l", "symlink", 0o777, target="f"),
        CheckpointEntry("x" * 300, "file", 0o600, b""),  # over ustar's 100 characters
    ]
    assert unpack_workspace(pack_workspace(entries)) == entries


def hostile_checkpoint(where: Path, tar: bytes, **record: Any) -> VmSnapshot:
    with SnapshotWriter(where) as writer:
        writer.add_blob(WORKSPACE_BLOB, tar)
        writer.add_blob(ENV_BLOB, b'{"env": {}}')
        writer.add_blob(AGENT_STATE_BLOB, b"{}")
        return writer.commit(
            kind=SnapshotKind.CHECKPOINT, backend="qemu", backend_version="7.2.0",
            arch="riscv64", cpu_model="x", vcpus=1, memory_mib=128,
            extra={RECORD_KEY: {"format": 1, "workspace": "/workspace", **record}},
        )


async def test_hostile_checkpoint_is_refused_before_the_guest_boots(tmp_path: Path) -> None:
    tar = raw_tar(member("a", tarfile.SYMTYPE, link="."), member("a/passwd", data=b"x"))
    snapshot = hostile_checkpoint(tmp_path / "evil", tar)
    vm = MockVm(VmConfig())
    with pytest.raises(SnapshotCorrupted, match=r"unsafe entry 'a/passwd'"):
        await vm.restore(VmSnapshot.open(snapshot.path))
    assert vm.boots == 0 and vm.state is VmState.STOPPED
    assert "/etc/passwd" not in vm.fs.files


@pytest.mark.parametrize(
    "record,env,message",
    [
        ({"workspace": "relative"}, b'{"env": {}}', "absolute guest path"),
        ({"workspace": "/"}, b'{"env": {}}', "whole guest system"),
        ({}, b'{"env": {"BAD=NAME": "x"}}', "env.json is malformed"),
        ({}, b'{"env": ["x"]}', "env.json is malformed"),
        ({"format": 2}, b'{"env": {}}', "format 2 is not supported"),
    ],
)
def test_bad_checkpoint_records(tmp_path: Path, record: dict[str, Any], env: bytes,
                                message: str) -> None:
    with SnapshotWriter(tmp_path / "bad") as writer:
        writer.add_blob(WORKSPACE_BLOB, raw_tar())
        writer.add_blob(ENV_BLOB, env)
        writer.add_blob(AGENT_STATE_BLOB, b"{}")
        snapshot = writer.commit(
            kind=SnapshotKind.CHECKPOINT, backend="qemu", backend_version="7", arch="x86_64",
            cpu_model="x", vcpus=1, memory_mib=128,
            extra={RECORD_KEY: {"format": 1, "workspace": "/workspace", **record}},
        )
    with pytest.raises((SnapshotCorrupted, SnapshotIncompatible), match=message):
        read_checkpoint(snapshot)
