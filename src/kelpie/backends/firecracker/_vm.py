"""FirecrackerVm: snapshots and restores of a Firecracker VM (the machine is ``_machine``).

A snapshot (a :class:`~kelpie.vm.VmSnapshot` directory) has these blobs::

    vmstate      Firecracker's snapshot file (full snapshots; PUT /snapshot/create)
    memory       the guest's memory (full snapshots)
    disk.ext4    the VM's writable root disk, sparse (when it has one)

Firecracker takes a full snapshot only of a paused VM (the base class pauses it) and loads
one only into a fresh process, so a full restore starts a new Firecracker and loads the
snapshot with the vsock on this VM directory's socket (``vsock_override``); the disk is
found by its relative path (see ``_machine``). A restored guest is resynced when it first
runs (clock, RNG, and the host name when it is another VM's snapshot). Checkpoints go
through the guest agent (:mod:`kelpie.vm._checkpoint`): any backend, any architecture.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from kelpie._paths import vms_dir
from kelpie.agent import check_vm_id, read_vm_record
from kelpie.backends.firecracker._machine import (
    ATTACH_TIMEOUT,
    DISK,
    PENDING_RESYNC,
    VSOCK,
    FirecrackerMachine,
    copy_sparse,
)
from kelpie.guestkit import GuestKit
from kelpie.vm import (
    ConfigError,
    SnapshotCorrupted,
    SnapshotKind,
    SnapshotWriter,
    StorageError,
    VmConfig,
    VmSnapshot,
    capture_checkpoint,
    checkpoint_config,
    read_checkpoint,
    replay_checkpoint,
)

STATE_BLOB = "vmstate"
MEMORY_BLOB = "memory"
DISK_BLOB = "disk.ext4"
RECORD_KEY = "firecracker"


class FirecrackerVm(FirecrackerMachine):
    """A micro-VM run by Firecracker: boot, attach, snapshots and restores."""

    @classmethod
    async def attach(cls, vm_id: str, *, workdir: Path | None = None,
                     kit: GuestKit | None = None, timeout: float = ATTACH_TIMEOUT,
                     firecracker: str | None = None) -> Self:
        """Reconnect to a VM an earlier process started, from its VM directory (default
        ``vms_dir() / vm_id``): RUNNING or PAUSED as Firecracker reports it, CRASHED when
        its Firecracker is gone. Raises when Firecracker runs but does not answer."""
        check_vm_id(vm_id)
        directory = workdir or vms_dir() / vm_id
        config = read_vm_record(directory, vm_id, cls.backend_name)
        vm = cls(config, vm_id=vm_id, workdir=directory, kit=kit, firecracker=firecracker)
        digest = vm._launch_record().get("guestkit_digest")
        vm._kit_digest = digest if isinstance(digest, str) else None
        await vm._reattach(timeout)
        return vm

    # ---- snapshots ----------------------------------------------------------------------
    async def _do_snapshot(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        if kind is SnapshotKind.CHECKPOINT:
            return await capture_checkpoint(self, dest)
        with SnapshotWriter(dest) as writer:
            blobs = []
            if kind is SnapshotKind.FULL:
                await self._unless_gone(self.api.create_snapshot(
                    writer.blob_path(STATE_BLOB), writer.blob_path(MEMORY_BLOB)), "snapshot")
                blobs += [STATE_BLOB, MEMORY_BLOB]
            if self.disk.exists():
                await copy_sparse(self.disk, writer.blob_path(DISK_BLOB))
                blobs.append(DISK_BLOB)
            try:
                for blob in blobs:
                    await asyncio.to_thread(writer.adopt_blob, blob)
            except OSError as exc:
                raise StorageError(f"VM {self.id}: cannot read the snapshot's {blob}: "
                                   f"{exc}") from exc
            host = self.host_info()
            return writer.commit(
                kind=kind, backend=host.backend, backend_version=host.backend_version,
                arch=host.arch, cpu_model=host.cpu_model, machine=host.machine,
                vcpus=self.config.vcpus, memory_mib=self.config.memory_mib,
                guestkit_digest=self._kit_digest, vm_id=self.id,
                extra={RECORD_KEY: {"config": self.config.to_dict(),
                                    "hostname": self._hostname(self.config)}},
            )

    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Checks first (the record, the configuration), then the disk, then Firecracker."""
        if snapshot.manifest.kind is SnapshotKind.CHECKPOINT:
            await self._restore_checkpoint(snapshot, paused=paused)
            return
        config = await self._prepare(_recorded_config(snapshot))
        self._interrupt_commands(
            f"VM {self.id} was restored from snapshot {snapshot.path} while this command "
            f"ran; commands do not survive a restore: run it again")
        with self._disk_replaced(config):
            if DISK_BLOB in snapshot.manifest.blobs:
                await copy_sparse(snapshot.blob_path(DISK_BLOB), self.disk)
            if snapshot.manifest.kind is SnapshotKind.DISK:
                await self._boot(config)
                if paused:
                    await self.api.pause()
                return
            await self._load(snapshot, config, paused=paused)

    async def _load(self, snapshot: VmSnapshot, config: VmConfig, *, paused: bool) -> None:
        """Load a full snapshot into a new Firecracker; resume it unless ``paused``."""
        api = await self._spawn_firecracker()
        deadline = time.monotonic() + self.boot_timeout
        await self._before_exit(api.load_snapshot(
            snapshot.blob_path(STATE_BLOB), snapshot.blob_path(MEMORY_BLOB), resume=False,
            vsock_uds=Path(VSOCK)), "loading the snapshot", deadline)
        same_vm = snapshot.manifest.vm_id == self.id
        self._plan_resync(self.workdir / PENDING_RESYNC,
                          None if same_vm else self._hostname(config))
        if paused:
            return  # resume() says hello and resyncs the guest
        await self._before_exit(api.resume(), "resuming the loaded VM", deadline)
        await self._before_exit(self.agent.connect(self.boot_timeout), "the agent's vsock port",
                                deadline)
        await self._before_exit(self.agent.hello(), "the guest agent's hello",
                                deadline)
        await self._before_exit(self._resync_pending(self.workdir / PENDING_RESYNC),
                                "the guest agent's resync", deadline)

    async def _do_resume(self) -> None:
        if self.agent.client is None:  # restored paused: nothing connected to the guest yet
            await self._unless_gone(self.api.resume(), "resume")
            await self._unless_gone(self.agent.connect(ATTACH_TIMEOUT), "resume")
            await self._finish_handshake(ATTACH_TIMEOUT)
            await self._resync_pending(self.workdir / PENDING_RESYNC)
            return
        await super()._do_resume()

    async def _restore_checkpoint(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Boot this VM's own configuration fresh (its earlier disk set aside), then write
        the checkpoint into it."""
        content = read_checkpoint(snapshot, self)
        config = await self._prepare(checkpoint_config(self._config, content))
        with self._disk_replaced(config):
            await self._prepare_disk(config)
            await self._boot(config)
            await replay_checkpoint(self, content)
            if paused:
                await self.api.pause()

    @contextlib.contextmanager
    def _disk_replaced(self, config: VmConfig) -> Iterator[None]:
        """Switch to ``config`` with this VM's disk set aside for the block; if the block
        fails, put the old disk and config back."""
        old_config = self._config
        kept = self.workdir / f".{DISK}.before-restore"
        self._prepare_workdir(config)
        self._config = config
        try:
            if self.disk.exists():
                self.disk.replace(kept)
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if kept.exists():
                    kept.replace(self.disk)
                else:
                    self.disk.unlink(missing_ok=True)
                self._config = old_config
                self._write_record(old_config)
            raise
        kept.unlink(missing_ok=True)


def _recorded_config(snapshot: VmSnapshot) -> VmConfig:
    """The configuration a Firecracker snapshot records (:class:`SnapshotCorrupted` if none)."""
    record: Any = snapshot.manifest.extra.get(RECORD_KEY)
    try:
        return VmConfig.from_dict(record["config"])
    except (TypeError, KeyError, ConfigError) as exc:
        raise SnapshotCorrupted(f"snapshot {snapshot.path} has no valid Firecracker record "
                                f"of its VM's configuration: {exc}") from exc

