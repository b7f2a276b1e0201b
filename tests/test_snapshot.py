"""Snapshot manifests, the writer's atomicity and the compatibility check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kelpie import HostInfo, SnapshotCorrupted, SnapshotIncompatible, SnapshotKind
from kelpie.vm import (
    BlobDigestMismatch,
    BlobSizeMismatch,
    ManifestCorrupted,
    SnapshotManifest,
    SnapshotTooLarge,
    SnapshotWriter,
    VmSnapshot,
)

FIELDS = dict(
    kind=SnapshotKind.FULL, backend="qemu", backend_version="7.2.0", arch="x86_64",
    cpu_model="max", machine="microvm", vcpus=2, memory_mib=512, guestkit_digest="sha256:aa",
)
HOST = HostInfo(arch="x86_64", backend="qemu", backend_version="7.2.5", cpu_model="max",
                machine="microvm", guestkit_digest="sha256:aa")


def test_manifest_json_round_trip(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path / "s") as writer:
        writer.add_blob("memory", b"m" * 100)
        snap = writer.commit(**FIELDS)
    again = VmSnapshot.open(tmp_path / "s")
    assert again.manifest == snap.manifest
    assert again.manifest.blobs["memory"].size == 100
    again.verify()
    assert again.read_blob("memory") == b"m" * 100


def test_writer_publishes_only_when_complete(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "s")
    writer.add_blob("a", b"1")
    assert not (tmp_path / "s").exists()
    with pytest.raises(SnapshotCorrupted, match="incomplete"):
        VmSnapshot.open(writer.partial)
    writer.commit(**FIELDS)
    assert (tmp_path / "s" / "manifest.json").exists() and not writer.partial.exists()


def test_writer_error_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), SnapshotWriter(tmp_path / "s") as writer:
        writer.add_blob("a", b"1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_size_limit(tmp_path: Path) -> None:
    with pytest.raises(SnapshotTooLarge, match="over the limit of 10"), \
            SnapshotWriter(tmp_path / "s", max_bytes=10) as writer:
        writer.add_blob("a", b"x" * 11)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    with pytest.raises(Exception, match="already exists"):
        SnapshotWriter(tmp_path / "s")


def test_adopt_blob_written_by_another_process(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "s")
    writer.blob_path("memory").write_bytes(b"q" * 5000)
    info = writer.adopt_blob("memory")
    assert info.size == 5000
    writer.commit(**FIELDS).verify()


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    with pytest.raises(SnapshotCorrupted, match=r"no manifest\.json"):
        VmSnapshot.open(tmp_path / "s")


def test_compatible_host() -> None:
    manifest = SnapshotManifest(blobs={}, created_at="x", **FIELDS)  # type: ignore[arg-type]
    assert manifest.incompatibilities(HOST) == []
    manifest.check_restorable(HOST)


def test_every_mismatch_listed() -> None:
    manifest = SnapshotManifest(blobs={}, created_at="x", **FIELDS)  # type: ignore[arg-type]
    other = HostInfo(arch="aarch64", backend="qemu", backend_version="8.0", cpu_model="host",
                     machine="virt", guestkit_digest="sha256:bb")
    with pytest.raises(SnapshotIncompatible) as info:
        manifest.check_restorable(other)
    reasons = info.value.reasons
    assert len(reasons) == 5
    text = str(info.value)
    for word in ("architecture", "backend version", "CPU model", "machine", "guest kit"):
        assert word in text


def test_backend_mismatch() -> None:
    manifest = SnapshotManifest(blobs={}, created_at="x", **FIELDS)  # type: ignore[arg-type]
    fc = HostInfo(arch="x86_64", backend="firecracker", backend_version="1.7", cpu_model="max",
                  machine="microvm")
    assert manifest.incompatibilities(fc) == [
        "backend: snapshot is from qemu, restoring with firecracker"
    ]


def test_checkpoint_is_portable() -> None:
    fields = {**FIELDS, "kind": SnapshotKind.CHECKPOINT}
    manifest = SnapshotManifest(blobs={}, created_at="x", **fields)  # type: ignore[arg-type]
    arm = HostInfo(arch="aarch64", backend="vz", backend_version="1")
    assert manifest.incompatibilities(arm) == []


@pytest.mark.parametrize("garbage", [b"", b"[]", b"{", b'{"checksum": "x"}'])
def test_garbage_manifest(garbage: bytes) -> None:
    with pytest.raises(SnapshotCorrupted):
        SnapshotManifest.from_json(garbage)


@pytest.mark.parametrize(("damage", "error"), [
    (lambda data: data[:-1], BlobSizeMismatch),
    (lambda data: bytes([data[0] ^ 1]) + data[1:], BlobDigestMismatch),
])
def test_each_kind_of_blob_damage_is_refused_by_its_own_check(
    tmp_path: Path, damage: Callable[[bytes], bytes], error: type[SnapshotCorrupted],
) -> None:
    with SnapshotWriter(tmp_path / "s") as writer:
        writer.add_blob("memory", b"m" * 100)
        writer.commit(**FIELDS)
    blob = tmp_path / "s" / "memory"
    blob.write_bytes(damage(blob.read_bytes()))
    snap = VmSnapshot.open(tmp_path / "s")
    for check in (snap.verify, lambda: snap.read_blob("memory")):
        with pytest.raises(SnapshotCorrupted) as caught:
            check()
        assert type(caught.value) is error


def test_a_manifest_that_lost_its_last_byte_is_refused(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path / "s") as writer:
        writer.commit(**FIELDS)
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-1])  # still JSON, checksum still right
    with pytest.raises(ManifestCorrupted, match="newline is missing"):
        VmSnapshot.open(tmp_path / "s")
