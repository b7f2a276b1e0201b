"""Snapshots on disk: the manifest, the blobs it vouches for, and the compatibility check.

A snapshot is a directory holding ``manifest.json`` and one file per blob. It is written
under a hidden partial name (``.NAME.partial``), blobs first and manifest last, and renamed
into place only when complete, so a crash midway never leaves something that looks like a
valid snapshot. The manifest carries its own checksum, and every blob's size and sha256.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kelpie._exceptions import (
    SnapshotCorrupted,
    SnapshotIncompatible,
    SnapshotTooLarge,
    StorageError,
)
from kelpie.vm._storage import CHUNK_SIZE, LocalStorage, Storage

SNAPSHOT_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"
_BLOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


class ManifestCorrupted(SnapshotCorrupted):
    """The manifest is malformed or does not match its own checksum."""


class BlobSizeMismatch(SnapshotCorrupted):
    """A blob's size is not the size its manifest records (truncated or extended)."""


class BlobDigestMismatch(SnapshotCorrupted):
    """A blob's sha256 is not the digest its manifest records (its bytes changed)."""


class SnapshotKind(enum.StrEnum):
    """What a snapshot holds."""

    FULL = "full"
    """Memory, device state and disk: resumes exactly where it was (same architecture)."""
    DISK = "disk"
    """Disk state of a stopped VM only."""
    CHECKPOINT = "checkpoint"
    """Workspace files, env and the agent's state: architecture independent."""


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """Size and sha256 (hex) of one snapshot blob."""

    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """What a host offers, for deciding whether a snapshot can be restored on it."""

    arch: str
    backend: str
    backend_version: str
    cpu_model: str = "host"
    machine: str = ""
    guestkit_digest: str | None = None

    @staticmethod
    def current_arch() -> str:
        """This host's architecture in the kernel's spelling (``x86_64``, ``aarch64``)."""
        machine = platform.machine().lower()
        return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@dataclasses.dataclass(frozen=True)
class SnapshotManifest:
    """Everything needed to decide whether and how a snapshot can be restored."""

    kind: SnapshotKind
    backend: str
    backend_version: str
    arch: str
    cpu_model: str
    vcpus: int
    memory_mib: int
    blobs: Mapping[str, BlobInfo]
    created_at: str
    machine: str = ""
    guestkit_digest: str | None = None
    base_image_digest: str | None = None
    vm_id: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = SNAPSHOT_FORMAT_VERSION

    def to_json(self) -> bytes:
        """Canonical JSON with a checksum over everything else in it."""
        body = self._body()
        body["checksum"] = _sha256(_canonical(body))
        return _canonical(body) + b"\n"

    def _body(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind.value,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "arch": self.arch,
            "cpu_model": self.cpu_model,
            "machine": self.machine,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "guestkit_digest": self.guestkit_digest,
            "base_image_digest": self.base_image_digest,
            "vm_id": self.vm_id,
            "created_at": self.created_at,
            "blobs": {
                name: {"size": b.size, "sha256": b.sha256} for name, b in sorted(self.blobs.items())
            },
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: bytes) -> SnapshotManifest:
        """Parse and check a manifest; :class:`SnapshotCorrupted` says what is wrong."""
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("manifest is not a JSON object")
            checksum = body.pop("checksum", None)
            if checksum != _sha256(_canonical(body)):
                raise ManifestCorrupted("manifest checksum does not match its content")
            if not data.endswith(b"\n"):  # the checksum cannot see a lost final newline
                raise ManifestCorrupted("manifest is truncated: its final newline is missing")
            version = body["format_version"]
            if version != SNAPSHOT_FORMAT_VERSION:
                raise SnapshotCorrupted(
                    f"manifest format version {version} is not supported "
                    f"(this Kelpie reads version {SNAPSHOT_FORMAT_VERSION})"
                )
            blobs = {
                str(name): BlobInfo(int(b["size"]), str(b["sha256"]))
                for name, b in body["blobs"].items()
            }
            return cls(
                kind=SnapshotKind(body["kind"]),
                backend=str(body["backend"]),
                backend_version=str(body["backend_version"]),
                arch=str(body["arch"]),
                cpu_model=str(body["cpu_model"]),
                machine=str(body["machine"]),
                vcpus=int(body["vcpus"]),
                memory_mib=int(body["memory_mib"]),
                guestkit_digest=body["guestkit_digest"],
                base_image_digest=body["base_image_digest"],
                vm_id=str(body["vm_id"]),
                created_at=str(body["created_at"]),
                blobs=blobs,
                extra=dict(body["extra"]),
                format_version=version,
            )
        except SnapshotCorrupted:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestCorrupted(f"manifest is malformed: {exc}") from exc

    def incompatibilities(self, host: HostInfo) -> list[str]:
        """Every reason this snapshot cannot be restored on ``host`` (empty: it can)."""
        reasons: list[str] = []
        if self.kind is SnapshotKind.CHECKPOINT:
            return reasons  # checkpoints are architecture and backend independent
        if self.arch != host.arch:
            reasons.append(f"architecture: snapshot is {self.arch}, this host is {host.arch}")
        if self.backend != host.backend:
            reasons.append(
                f"backend: snapshot is from {self.backend}, restoring with {host.backend}"
            )
        elif _major(self.backend_version) != _major(host.backend_version):
            reasons.append(
                f"backend version: snapshot is from {self.backend} {self.backend_version}, "
                f"this host has {host.backend_version} (major versions differ)"
            )
        if self.kind is SnapshotKind.FULL:
            if self.cpu_model != host.cpu_model:
                reasons.append(f"CPU model: snapshot is {self.cpu_model}, host is {host.cpu_model}")
            if self.machine and host.machine and self.machine != host.machine:
                reasons.append(f"machine: snapshot is {self.machine}, host is {host.machine}")
            if (
                self.guestkit_digest is not None
                and host.guestkit_digest is not None
                and self.guestkit_digest != host.guestkit_digest
            ):
                reasons.append(
                    f"guest kit: snapshot needs {self.guestkit_digest[:19]}, "
                    f"this host has {host.guestkit_digest[:19]}"
                )
        return reasons

    def check_restorable(self, host: HostInfo) -> None:
        """Raise :class:`SnapshotIncompatible` listing every mismatch with ``host``."""
        reasons = self.incompatibilities(host)
        if reasons:
            raise SnapshotIncompatible(reasons)


@dataclasses.dataclass(frozen=True)
class VmSnapshot:
    """A complete snapshot directory: its manifest and where its blobs are."""

    path: Path
    manifest: SnapshotManifest
    storage: Storage = dataclasses.field(default_factory=LocalStorage, compare=False, repr=False)

    @classmethod
    def open(cls, path: Path, *, storage: Storage | None = None) -> VmSnapshot:
        """Open a snapshot directory and check its manifest (not yet the blobs)."""
        store = storage or LocalStorage()
        if path.name.endswith(PARTIAL_SUFFIX):
            raise SnapshotCorrupted(f"{path} is an incomplete snapshot (still being written)")
        manifest_path = path / MANIFEST_NAME
        if not store.exists(manifest_path):
            raise SnapshotCorrupted(f"{path} has no {MANIFEST_NAME}: not a complete snapshot")
        try:
            data = store.read_bytes(manifest_path)
        except StorageError as exc:
            raise ManifestCorrupted(f"{path}: cannot read manifest: {exc}") from exc
        return cls(path, SnapshotManifest.from_json(data), store)

    def blob_path(self, name: str) -> Path:
        """Where blob ``name`` lives; :class:`SnapshotCorrupted` if the manifest lacks it."""
        if name not in self.manifest.blobs:
            raise SnapshotCorrupted(f"{self.path}: manifest lists no blob {name!r}")
        return self.path / name

    def read_blob(self, name: str) -> bytes:
        """Read one blob whole and check its size and digest."""
        info = self.manifest.blobs.get(name)
        if info is None:
            raise SnapshotCorrupted(f"{self.path}: manifest lists no blob {name!r}")
        try:
            data = self.storage.read_bytes(self.path / name)
        except StorageError as exc:
            raise SnapshotCorrupted(f"{self.path}: blob {name!r} is unreadable: {exc}") from exc
        _check_blob(self.path, name, info, len(data), _sha256(data))
        return data

    def verify(self) -> None:
        """Check every blob's size and sha256; :class:`SnapshotCorrupted` names the bad one."""
        for name, info in sorted(self.manifest.blobs.items()):
            path = self.path / name
            try:
                size = self.storage.size(path)
                if size != info.size:
                    _check_blob(self.path, name, info, size, "")
                digest = hashlib.sha256()
                with self.storage.open_read(path) as f:
                    while chunk := f.read(CHUNK_SIZE):
                        digest.update(chunk)
            except StorageError as exc:
                raise SnapshotCorrupted(f"{self.path}: blob {name!r} is unreadable: {exc}") from exc
            _check_blob(self.path, name, info, size, digest.hexdigest())


def _check_blob(where: Path, name: str, info: BlobInfo, size: int, sha: str) -> None:
    """The one place a blob is checked against its manifest: size first, then sha256 (an
    empty ``sha``: the size check alone, before hashing a file of the wrong size)."""
    if size != info.size:
        raise BlobSizeMismatch(
            f"{where}: blob {name!r} is {size} bytes, manifest says {info.size} (truncated?)"
        )
    if sha and sha != info.sha256:
        raise BlobDigestMismatch(
            f"{where}: blob {name!r} has sha256 {sha[:16]}..., manifest says "
            f"{info.sha256[:16]}... (corrupted)"
        )


class SnapshotWriter:
    """Writes a snapshot under a partial name and publishes it only when complete.

    Use as ``writer = SnapshotWriter(dest)``; ``add_blob`` / ``adopt_blob`` each blob, then
    ``commit(...)`` writes the manifest and renames into place. ``abort()`` (also called on
    error inside ``with``) removes the partial directory.
    """

    def __init__(
        self, dest: Path, *, storage: Storage | None = None, max_bytes: int | None = None
    ) -> None:
        self.dest = dest
        self.storage = storage or LocalStorage()
        self.partial = dest.parent / f".{dest.name}{PARTIAL_SUFFIX}"
        self.max_bytes = max_bytes
        self._blobs: dict[str, BlobInfo] = {}
        if self.storage.exists(dest):
            raise StorageError(f"snapshot destination {dest} already exists")
        self.storage.remove_tree(self.partial)  # left over from an earlier crash
        self.storage.mkdir(self.partial)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self._blobs.values())

    def _check_name(self, name: str) -> None:
        if not _BLOB_NAME.match(name) or name == MANIFEST_NAME:
            raise ValueError(f"invalid blob name {name!r}")
        if name in self._blobs:
            raise ValueError(f"blob {name!r} added twice")

    def _account(self, name: str, info: BlobInfo) -> None:
        if self.max_bytes is not None and self.total_bytes + info.size > self.max_bytes:
            raise SnapshotTooLarge(self.total_bytes + info.size, self.max_bytes)
        self._blobs[name] = info

    def add_blob(self, name: str, data: bytes) -> BlobInfo:
        """Write a blob from memory."""
        self._check_name(name)
        info = BlobInfo(len(data), _sha256(data))
        self._account(name, info)
        self.storage.write_bytes(self.partial / name, data)
        return info

    def adopt_blob(self, name: str) -> BlobInfo:
        """Record a blob that something else (e.g. QEMU) already wrote to ``blob_path``."""
        self._check_name(name)
        path = self.partial / name
        digest = hashlib.sha256()
        size = 0
        with self.storage.open_read(path) as f:
            while chunk := f.read(CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
        info = BlobInfo(size, digest.hexdigest())
        self._account(name, info)
        return info

    def blob_path(self, name: str) -> Path:
        """Where a blob written by another process should go before :meth:`adopt_blob`."""
        return self.partial / name

    def commit(self, **manifest_fields: Any) -> VmSnapshot:
        """Write the manifest (blobs filled in) and publish the snapshot atomically."""
        fields = dict(manifest_fields)
        fields.setdefault("created_at", utc_now())
        manifest = SnapshotManifest(blobs=dict(self._blobs), **fields)
        self.storage.write_bytes(self.partial / MANIFEST_NAME, manifest.to_json())
        self.storage.rename(self.partial, self.dest)
        return VmSnapshot(self.dest, manifest, self.storage)

    def abort(self) -> None:
        """Remove the partial directory (best effort: a later writer removes leftovers)."""
        with contextlib.suppress(StorageError):
            self.storage.remove_tree(self.partial)


def utc_now() -> str:
    """The current UTC time as an ISO 8601 string (second precision)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _major(version: str) -> str:
    return version.split(".", 1)[0]
