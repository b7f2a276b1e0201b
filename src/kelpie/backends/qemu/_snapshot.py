"""What a QEMU snapshot holds besides its blobs, and the disk and base image behind it.

A QEMU snapshot (a :class:`~kelpie.vm.VmSnapshot` directory) has these blobs::

    memory       the VM state written by QMP ``migrate``: device state and guest RAM
                 (full snapshots only; zero pages take almost no room)
    disk.qcow2   the VM's qcow2 overlay, i.e. everything the guest changed on its root
                 disk (absent when the VM has no root disk)

The read-only base image under the overlay is not copied: the manifest names it by
digest (``base_image_digest``, see :data:`SPARSE`) and ``extra["qemu"]``
(:class:`SnapshotRecord`) says where it was, with everything else a restore needs to
rebuild the same QEMU command line: the VM's configuration, its accelerator and host
name, and the device signature of its command line
(:func:`~kelpie.backends.qemu._cmdline.device_signature`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kelpie._fsutil import SPARSE, sparse_digest, write_atomic
from kelpie._paths import state_dir
from kelpie.vm import (
    ConfigError,
    HostInfo,
    NetworkMode,
    SnapshotCorrupted,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotKind,
    SnapshotManifest,
    VmConfig,
)

RECORD_KEY = "qemu"
RECORD_VERSION = 1
MEMORY_BLOB = "memory"
RAM_BLOB = "ram"
DISK_BLOB = "disk.qcow2"
_CHUNK = 1024 * 1024
_QCOW2_MAGIC = b"QFI\xfb"


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    """What a restore needs besides the blobs (stored as the manifest's ``extra["qemu"]``)."""

    config: VmConfig
    """The VM's configuration when the snapshot was taken (its ``config.json``)."""
    hostname: str
    """The guest's host name when the VM booted."""
    accel: str
    base_path: Path | None
    """Where the read-only base image under the disk overlay was on the snapshot's host."""
    base_format: str | None
    signature: tuple[str, ...]
    """The device signature of the VM's command line (full snapshots)."""
    migration: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """QEMU's statistics of the save (``query-migrate``), for the curious."""
    memory: str = "stream"
    """Where a full snapshot keeps the guest's RAM: ``stream`` (in the migration stream,
    blob ``memory``) or ``file`` (a raw file, blob ``ram``, that restores map copy-on-write
    and share; ``memory`` then holds the device state only)."""

    def to_extra(self) -> dict[str, Any]:
        return {
            RECORD_KEY: {
                "version": RECORD_VERSION,
                "config": self.config.to_dict(),
                "hostname": self.hostname,
                "accel": self.accel,
                "base_image": None if self.base_path is None else {
                    "path": str(self.base_path), "format": self.base_format,
                },
                "signature": list(self.signature),
                "migration": dict(self.migration),
                "memory": self.memory,
            }
        }

    @classmethod
    def from_manifest(cls, manifest: SnapshotManifest) -> SnapshotRecord:
        """Read the record; :class:`SnapshotCorrupted` says what is missing or wrong."""
        return cls.from_extra(manifest.extra)

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> SnapshotRecord:
        """Read the record from a manifest's ``extra`` (or a live migration's plan)."""
        data = extra.get(RECORD_KEY)
        if not isinstance(data, dict):
            raise SnapshotCorrupted(
                f"the manifest has no extra[{RECORD_KEY!r}] record: not a QEMU snapshot made "
                f"by Kelpie"
            )
        if data.get("version") != RECORD_VERSION:
            raise SnapshotCorrupted(
                f"QEMU snapshot record version {data.get('version')!r} is not supported "
                f"(this Kelpie reads version {RECORD_VERSION})"
            )
        try:
            base = data["base_image"]
            return cls(
                config=VmConfig.from_dict(data["config"]),
                hostname=str(data["hostname"]),
                accel=str(data["accel"]),
                base_path=None if base is None else Path(base["path"]),
                base_format=None if base is None else str(base["format"]),
                signature=tuple(str(arg) for arg in data["signature"]),
                migration=dict(data.get("migration") or {}),
                memory=str(data.get("memory") or "stream"),
            )
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotCorrupted(f"the QEMU snapshot record is malformed: {exc}") from exc


def image_format(path: Path) -> str:
    """``qcow2`` or ``raw``: what ``qemu-img`` should open ``path`` as."""
    with path.open("rb") as f:
        return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"


# ---- base image digests -------------------------------------------------------------------


def _digest_cache() -> Path:
    return state_dir() / "qemu-base-digests.json"


def file_digest(path: Path, algorithm: str = SPARSE) -> str:
    """``sparse-sha256:<hex>`` (or ``sha256:<hex>``) of a read-only base image, cached on
    disk by the file's real path, inode, size and modification time: a base image is
    hashed once per change, not on every snapshot."""
    real = path.resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{algorithm}"
    cache_file = _digest_cache()
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    cached = cache.get(key)
    if isinstance(cached, str):
        return cached
    value = sparse_digest(real) if algorithm == SPARSE else _full_digest(real)
    stale = f"|{algorithm}"  # this file's older entries of the same algorithm
    cache = {k: v for k, v in cache.items()
             if not (k.startswith(f"{real}|") and k.endswith(stale))}
    cache[key] = value
    with contextlib.suppress(OSError):  # a cache, not a record: losing it costs a rehash
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, json.dumps(cache, indent=1).encode())
    return value


def _full_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def find_base_image(digest: str, candidates: Sequence[Path]) -> Path:
    """The first candidate whose digest is ``digest`` (see :data:`SPARSE`); else
    :class:`SnapshotIncompatible`."""
    tried = []
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            tried.append(f"{path} does not exist")
            continue
        algorithm = digest.partition(":")[0]
        actual = file_digest(path, SPARSE if algorithm == SPARSE else "sha256")
        if actual == digest:
            return path
        tried.append(f"{path} has {actual}")
    raise SnapshotIncompatible([
        f"base image {digest} is missing on this host ({'; '.join(tried) or 'no path known'}):"
        f" the snapshot's disk is an overlay on that read-only image. Make the image "
        f"available again (pull or rebuild it), or restore into a VM whose root_disk is a "
        f"file with that digest"
    ])


# ---- configuration ------------------------------------------------------------------------


def restored_config(
    recorded: VmConfig, own: VmConfig, kind: SnapshotKind, base: Path | None
) -> VmConfig:
    """The configuration a restore runs with.

    The snapshot's configuration fixes the machine and its devices (memory, vCPUs, disk,
    shares, network), which a full restore must reproduce exactly. The restoring VM's own
    configuration may set what only the host sees: the host name (the guest is renamed),
    published ports and extra environment variables for commands.
    """
    if own.arch is not None and own.arch != (recorded.arch or HostInfo.current_arch()):
        raise SnapshotIncompatible([
            f"architecture: the snapshot's guest is {recorded.arch or 'the host arch'}, this VM's "
            f"is {own.arch}; a full or disk snapshot restores only into a guest of its own "
            f"architecture (a checkpoint moves across)"])
    changes: dict[str, Any] = {"root_disk": base}
    if own.hostname:
        changes["hostname"] = own.hostname
    if own.env:
        changes["env"] = {**recorded.env, **own.env}
    if own.ports:
        had_nic = recorded.network is not NetworkMode.NONE or bool(recorded.ports)
        if kind is SnapshotKind.FULL and not had_nic:
            raise ConfigError([
                "ports: the snapshot's VM had no network device (network none, no published "
                "ports), and a full restore cannot add one; restore without ports"
            ])
        changes["ports"] = own.ports
    return recorded.evolve(**changes)


# ---- files --------------------------------------------------------------------------------


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to the new file ``target`` and make it durable (fsync)."""
    shutil.copyfile(source, target)
    sync_file(target)


def sync_file(path: Path) -> None:
    """fsync one file, so a manifest never becomes durable before the blob it vouches for."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def install_overlay(blob: Path, target: Path, base: Path, base_format: str) -> None:
    """Copy a snapshot's overlay to ``target``, its backing file pointing at ``base``.

    The overlay names its backing file by absolute path, which may differ on this host
    (another state directory, another image store): ``qemu-img rebase -u`` rewrites only
    that header field, the data stays as it is.
    """
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        await asyncio.to_thread(shutil.copyfile, blob, partial)
        backing = await asyncio.to_thread(base.resolve)
        await _qemu_img(
            "rebase", "-u", "-f", "qcow2", "-F", base_format, "-b", str(backing), str(partial)
        )
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


async def _qemu_img(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        raise SnapshotError(f"qemu-img {args[0]} failed: {err.decode(errors='replace').strip()}")
