"""Full and disk snapshots of a QEMU VM (checkpoints come from :mod:`kelpie.vm._checkpoint`).

Full snapshots save the device state and RAM with QMP migration to a file and copy the
overlay (see ``_migration`` and ``_snapshot``); disk snapshots are the overlay of a stopped
VM. While a full snapshot is taken, ``snapshot-in-progress.json`` in the VM directory says
so (see ``_attach`` for what a later attach does when its process died).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from kelpie._fsutil import copy_sparse
from kelpie.backends.qemu import _migration, _snapshot
from kelpie.backends.qemu._cmdline import QemuLaunch, cpu_model, device_signature
from kelpie.backends.qemu._machine import OVERLAY, SNAPSHOT_MARKER, QemuMachine
from kelpie.backends.qemu._snapshot import DISK_BLOB, MEMORY_BLOB, RAM_BLOB, SnapshotRecord
from kelpie.vm import (
    PARTIAL_SUFFIX,
    SnapshotError,
    SnapshotKind,
    SnapshotWriter,
    StorageError,
    VmSnapshot,
    capture_checkpoint,
)


@dataclasses.dataclass
class _SnapshotPlan:
    """The full snapshot this task is taking (see :data:`_SNAPSHOT_PLAN`)."""

    saver: QemuSaver
    dest: Path
    leave_paused: bool
    shareable: bool = False
    """Keep the RAM as a file that restores map copy-on-write (clones share its pages)."""
    marked: bool = False
    """Whether this snapshot has written its marker (and must remove it)."""


_SNAPSHOT_PLAN: contextvars.ContextVar[_SnapshotPlan | None] = contextvars.ContextVar(
    "kelpie_qemu_snapshot_plan", default=None
)
"""Set by :meth:`QemuSaver.taking` around the base class's ``snapshot()`` for the hooks it
calls under its lock (``_do_pause``, ``_do_snapshot``): per task, so a ``pause()``
elsewhere is not mistaken for a snapshot's."""


def partial_dir_of(dest: Path) -> Path:
    """Where :class:`SnapshotWriter` writes the snapshot ``dest`` until it is complete."""
    return dest.parent / f".{dest.name}{PARTIAL_SUFFIX}"


class QemuSaver:
    """Writes one QEMU VM's full (QMP migration) and disk (overlay) snapshots, and the
    marker telling a later attach that a full snapshot of it was being taken."""

    def __init__(self, vm: QemuMachine) -> None:
        self._vm = vm

    @contextlib.contextmanager
    def taking(self, dest: Path, kind: SnapshotKind, leave_paused: bool,
               shareable: bool = False) -> Iterator[None]:
        """Around the base class's ``snapshot()``: the plan of a full snapshot, for
        :meth:`mark`; the marker it wrote is removed at the end.

        While a full snapshot is taken, ``snapshot-in-progress.json`` in the VM directory
        says so, written before the guest pauses and removed once it is back as it should
        be: if this process dies in between, ``attach`` undoes the snapshot.
        """
        if kind is not SnapshotKind.FULL:
            yield
            return
        plan = _SnapshotPlan(self, dest, leave_paused, shareable)
        token = _SNAPSHOT_PLAN.set(plan)
        try:
            yield
        finally:
            _SNAPSHOT_PLAN.reset(token)
            if plan.marked:
                with contextlib.suppress(FileNotFoundError):
                    (self._vm.workdir / SNAPSHOT_MARKER).unlink()

    def mark(self, *, running: bool) -> None:
        """Write the marker of the full snapshot this task is taking of this VM, once.

        Called (under the base class's lock) before a running guest is paused, else when
        the snapshot of a paused one starts. Not fsynced: it guards against the death of
        this process, not of the host, which QEMU would not survive either.
        """
        plan = _SNAPSHOT_PLAN.get()
        if plan is None or plan.saver is not self or plan.marked:
            return
        marker = {
            "was_running": running,
            "resume": running and not plan.leave_paused,
            "dest": str(plan.dest),
            "partial": str(partial_dir_of(plan.dest)),
            "pid": os.getpid(),
        }
        path = self._vm.workdir / SNAPSHOT_MARKER
        temporary = path.with_name(f".{SNAPSHOT_MARKER}.tmp")
        with _storage_errors(f"writing the snapshot marker {path}"):
            temporary.write_text(json.dumps(marker) + "\n")
            temporary.replace(path)
        plan.marked = True

    async def take(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        """The snapshot ``kind`` of the VM in the new directory ``dest`` (a full one of a
        VM the base class paused, a disk one of a stopped VM, a checkpoint of a running one)."""
        if kind is SnapshotKind.FULL:
            return await self._full_snapshot(dest)
        if kind is SnapshotKind.CHECKPOINT:  # from the running guest, through the agent
            return await capture_checkpoint(self._vm, dest)
        return await self._disk_snapshot(dest)

    async def _full_snapshot(self, dest: Path) -> VmSnapshot:
        """Memory and device state (QMP migrate to a file) plus the disk overlay.

        The base class paused the guest (QMP ``stop``, which also drains and flushes the
        disks). When the migration completes QEMU inactivates the disks (flushing again),
        so the overlay is copied in a consistent state; ``cont`` re-activates them.
        """
        qmp = self._vm._qmp
        if qmp is None or not self._vm._vmm_running():
            raise self._vm._vmm_gone_error("snapshot")
        self.mark(running=False)  # a paused guest: no-op if the pause marked it
        status = await self._vm._qmp_execute("query-status")
        if isinstance(status, dict) and status.get("status") == "postmigrate":
            # Paused since an earlier snapshot: QEMU 7.2 refuses to migrate a VM "paused
            # due to previous migration", and only cont re-activates its disks.
            await self._vm._qmp_execute("cont")
            await self._vm._qmp_execute("stop")
        record = await self._snapshot_record(SnapshotKind.FULL)
        plan = _SNAPSHOT_PLAN.get()
        ram = self._vm.ram_file if plan is not None and plan.shareable and \
            self._vm.owns_ram_file() else None
        with SnapshotWriter(dest) as writer:
            memory = writer.blob_path(MEMORY_BLOB)
            try:
                stats = await self._vm._unless_gone(
                    _migration.save_state(qmp, memory, bandwidth=self._vm.snapshot_bandwidth,
                                          ignore_shared=ram is not None),
                    "snapshot",
                )
            except (_migration.MigrationFailed, QMPError, OSError) as exc:
                if not self._vm._vmm_running():
                    raise self._vm._vmm_gone_error("snapshot") from exc
                raise SnapshotError(_save_failure(self._vm.id, str(exc))) from exc
            record = dataclasses.replace(record, migration=_migration_summary(stats))
            with _storage_errors(f"the snapshot's memory blob {memory}"):
                await asyncio.to_thread(_snapshot.sync_file, memory)
                await asyncio.to_thread(writer.adopt_blob, MEMORY_BLOB)
            if ram is not None:  # the guest is paused: its RAM file holds the frozen state
                with _storage_errors(f"copying the guest's RAM {ram} into the snapshot"):
                    await asyncio.to_thread(copy_sparse, ram, writer.blob_path(RAM_BLOB))
                    await asyncio.to_thread(writer.adopt_blob, RAM_BLOB)
                record = dataclasses.replace(record, memory="file")
            return await self._finish_snapshot(writer, record, SnapshotKind.FULL)

    async def _disk_snapshot(self, dest: Path) -> VmSnapshot:
        """The overlay of a stopped VM (QEMU has exited and flushed it)."""
        record = await self._snapshot_record(SnapshotKind.DISK)
        with SnapshotWriter(dest) as writer:
            return await self._finish_snapshot(writer, record, SnapshotKind.DISK)

    async def _snapshot_record(self, kind: SnapshotKind) -> SnapshotRecord:
        vm = self._vm
        launch = vm._launch_record()
        accel = vm.accel.accel if vm.accel else str(launch.get("accel", "tcg"))
        hostname = str(launch.get("hostname") or vm.config.hostname or f"kelpie-{vm.id[:8]}")
        base = vm.config.root_disk
        signature: tuple[str, ...] = ()
        if kind is SnapshotKind.FULL:
            signature = tuple(device_signature(QemuLaunch(
                qemu="", config=vm.config, kernel=Path(), initrd=Path(), workdir=vm.workdir,
                accel=accel, hostname=hostname,
                overlay=None if base is None else vm.workdir / OVERLAY, arch=vm.arch,
                ram=Path("/ram") if launch.get("ram") else None,  # file-backed RAM, or not
            )))
        return SnapshotRecord(
            config=vm.config, hostname=hostname, accel=accel,
            base_path=None if base is None else base.resolve(),
            base_format=None if base is None else await asyncio.to_thread(
                _snapshot.image_format, base
            ),
            signature=signature,
        )

    async def _finish_snapshot(
        self, writer: SnapshotWriter, record: SnapshotRecord, kind: SnapshotKind
    ) -> VmSnapshot:
        """Add the disk overlay, then publish the manifest."""
        base_digest = None
        if record.base_path is not None:
            try:
                base_digest = await asyncio.to_thread(_snapshot.file_digest, record.base_path)
            except OSError as exc:
                raise SnapshotError(
                    f"VM {self._vm.id}: cannot read its base image {record.base_path}: {exc}"
                ) from exc
            overlay = self._vm.workdir / OVERLAY
            if overlay.exists():
                with _storage_errors(f"copying the disk overlay {overlay} into the snapshot"):
                    await asyncio.to_thread(
                        _snapshot.copy_file, overlay, writer.blob_path(DISK_BLOB)
                    )
                    await asyncio.to_thread(writer.adopt_blob, DISK_BLOB)
        host = self._vm.host_info()
        return writer.commit(
            kind=kind, backend=host.backend, backend_version=host.backend_version,
            arch=host.arch, cpu_model=cpu_model(host.arch, record.accel), machine=host.machine,
            vcpus=self._vm.config.vcpus, memory_mib=self._vm.config.memory_mib,
            guestkit_digest=self._vm._kit_digest, base_image_digest=base_digest, vm_id=self._vm.id,
            extra=record.to_extra(),
        )


@contextlib.contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what}: {exc.strerror or exc}") from exc


def _save_failure(vm_id: str, reason: str) -> str:
    message = f"VM {vm_id}: QEMU could not save the VM state: {reason}"
    if "VirtFS" in reason or "9p" in reason:
        message += (
            "; QEMU cannot snapshot the memory of a VM with a mounted shared directory "
            "(virtio-9p): take a disk snapshot of the stopped VM, or run without mounts"
        )
    return message


def _migration_summary(stats: dict[str, Any]) -> dict[str, Any]:
    ram = stats.get("ram") if isinstance(stats.get("ram"), dict) else {}
    assert isinstance(ram, dict)
    return {
        "total_time_ms": stats.get("total-time"),
        "ram_total": ram.get("total"),
        "ram_transferred": ram.get("transferred"),
        "normal_pages": ram.get("normal"),
        "zero_pages": ram.get("duplicate"),
    }
