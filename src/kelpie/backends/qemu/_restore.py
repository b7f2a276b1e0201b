"""Restoring a QEMU VM from a full, disk or checkpoint snapshot.

A full restore starts QEMU with ``-incoming defer`` and loads the saved VM state into it
(see ``_migration``), then the guest resyncs (clock, RNG reseed, host name); a disk restore
boots the base image with the saved overlay; a checkpoint restore boots this VM's own
configuration fresh and writes the workspace back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

from kelpie.backends.qemu import _migration, _snapshot
from kelpie.backends.qemu._cmdline import QemuLaunch, device_signature
from kelpie.backends.qemu._machine import OVERLAY, PENDING_RESYNC, QemuMachine
from kelpie.backends.qemu._snapshot import DISK_BLOB, MEMORY_BLOB, RAM_BLOB, SnapshotRecord
from kelpie.vm import (
    SnapshotIncompatible,
    SnapshotKind,
    VmConfig,
    VmSnapshot,
    checkpoint_config,
    read_checkpoint,
    replay_checkpoint,
)

"""Fresh host randomness a restored guest mixes into its kernel RNG (then reseeds)."""


class QemuRestorer:
    """Restores full, disk and checkpoint snapshots into one QEMU VM, and resyncs a guest
    restored from a full snapshot once it runs."""

    def __init__(self, vm: QemuMachine) -> None:
        self._vm = vm

    async def restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Rebuild the snapshot's VM here: checks first, then the disk, then QEMU.

        Everything that can refuse the snapshot (its record, the base image, the guest
        kit, the device signature) is checked before the VM directory changes or any QEMU
        starts. A full restore loads the VM state into a QEMU started with ``-incoming
        defer``, then the guest resyncs (clock, RNG reseed, host name); a disk restore
        boots the base image with the saved overlay; a checkpoint restore boots this VM's
        own configuration fresh and writes the workspace back (:meth:`_restore_checkpoint`).
        """
        if snapshot.manifest.kind is SnapshotKind.CHECKPOINT:
            await self._restore_checkpoint(snapshot, paused=paused)
            return
        manifest = snapshot.manifest
        kind = manifest.kind
        record = SnapshotRecord.from_manifest(manifest)
        base = None
        if record.base_path is not None:
            if manifest.base_image_digest is None:
                raise SnapshotIncompatible(["the snapshot names no digest for its base image"])
            candidates = [p for p in (self._vm.config.root_disk, record.base_path) if p is not None]
            base = await asyncio.to_thread(
                _snapshot.find_base_image, manifest.base_image_digest, candidates
            )
        config = _snapshot.restored_config(record.config, self._vm.config, kind, base)
        launch = await self._vm._prepare_launch(config, incoming=kind is SnapshotKind.FULL)
        manifest.check_restorable(self._vm.host_info())
        if kind is SnapshotKind.FULL:
            launch = _cpu_of(_memory_of(launch, record, snapshot), record)
            signature = tuple(device_signature(dataclasses.replace(
                launch, overlay=None if base is None else self._vm.workdir / OVERLAY,
            )))
            if signature != record.signature:
                raise SnapshotIncompatible([_signature_mismatch(record.signature, signature)])
        # Checked: from here on the VM directory changes (undone if the restore fails).
        reason = (
            f"VM {self._vm.id} was restored from snapshot {snapshot.path} while this command "
            f"ran; commands do not survive a restore (their agent connection ended when the "
            f"VM stopped): run it again"
        )
        self._vm._interrupt_commands(reason)
        overlay = self._vm.workdir / OVERLAY
        async with self._disk_replaced(launch, config):
            if base is not None and DISK_BLOB in manifest.blobs:
                assert record.base_format is not None
                await _snapshot.install_overlay(
                    snapshot.blob_path(DISK_BLOB), overlay, base, record.base_format
                )
                launch = dataclasses.replace(launch, overlay=overlay)
            elif base is not None:
                launch = dataclasses.replace(launch, overlay=await self._vm._prepare_overlay())
            if kind is SnapshotKind.FULL:
                await self._resume_state(snapshot, launch, paused=paused,
                                         same_vm=manifest.vm_id == self._vm.id)
            else:
                await self._vm._boot(launch)
                if paused:
                    await self._vm._qmp_execute("stop")

    @contextlib.asynccontextmanager
    async def _disk_replaced(self, launch: QemuLaunch, config: VmConfig) -> AsyncIterator[None]:
        """Switch to ``config`` with this VM's disk overlay set aside for the block; if the
        block fails, put the old overlay (or none) and config back."""
        old_config = self._vm._config
        overlay = self._vm.workdir / OVERLAY
        kept = self._vm.workdir / ".overlay.qcow2.before-restore"
        self._vm._prepare_workdir(launch)
        self._vm._config = config
        try:
            if overlay.exists():
                overlay.replace(kept)
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if kept.exists():
                    kept.replace(overlay)  # QEMU, stopped next, keeps the new one open
                else:
                    overlay.unlink(missing_ok=True)
                self._vm._config = old_config
                self._vm._write_record(dataclasses.replace(launch, config=old_config))
            raise
        kept.unlink(missing_ok=True)

    async def _restore_checkpoint(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Boot fresh from this VM's own configuration, then write the checkpoint into it.

        Architecture and backend independent (see :mod:`kelpie.vm._checkpoint`): the
        checkpoint is read and checked whole before anything changes; its env joins the
        config's. A disk overlay from this VM's earlier life is set aside (put back if the
        restore fails), so the guest starts from its image like a new VM.
        """
        content = read_checkpoint(snapshot, self._vm)
        config = checkpoint_config(self._vm._config, content)
        launch = await self._vm._prepare_launch(config)
        async with self._disk_replaced(launch, config):
            overlay = await self._vm._prepare_overlay()
            await self._vm._boot_retrying(dataclasses.replace(launch, overlay=overlay))
            await replay_checkpoint(self._vm, content)
            if paused:
                await self._vm._qmp_execute("stop")

    async def _resume_state(
        self, snapshot: VmSnapshot, launch: QemuLaunch, *, paused: bool, same_vm: bool
    ) -> None:
        """Start QEMU waiting for a migration, load the snapshot's VM state into it."""
        await self._vm._spawn_qemu(launch)
        deadline = time.monotonic() + self._vm.boot_timeout
        qmp = await self._vm._before_exit(self._vm._connect_qmp(), "the QMP socket", deadline)
        self._vm._qmp = qmp
        await self._vm._before_exit(
            _migration.load_state(qmp, snapshot.blob_path(MEMORY_BLOB),
                                  ignore_shared=launch.ram is not None and not launch.ram_shared),
            "loading the snapshot's VM state", deadline,
        )
        # Connected before the guest runs: it then sees its host as still connected and
        # keeps reading; the hello ends the session it had with the snapshotted VM's host.
        await self._vm._before_exit(
            self._vm.agent.connect(self._vm.boot_timeout), "the agent socket", deadline
        )
        self._vm._plan_resync(self._vm.workdir / PENDING_RESYNC,
                              None if same_vm else launch.hostname)
        if paused:
            return  # resume() says hello and resyncs the guest
        await self._vm._before_exit(qmp.execute("cont"), "QMP cont", deadline)
        await self._vm._before_exit(self._vm.agent.hello(), "the guest agent's hello", deadline)
        await self._vm._before_exit(self.finish(), "the guest agent's resync", deadline)

    async def finish(self) -> None:
        """Resync a restored guest once it runs: clock, RNG (reseeded), host name."""
        await self._vm._resync_pending(self._vm.workdir / PENDING_RESYNC)


def _memory_of(launch: QemuLaunch, record: SnapshotRecord, snapshot: VmSnapshot) -> QemuLaunch:
    """Where a full restore's RAM comes from: a private copy-on-write mapping of the
    snapshot's RAM file (every clone of it shares the pages it has not written), or the
    migration stream into a RAM file of the VM's own (anonymous memory for a snapshot of a
    VM that had it, so its device signature still matches)."""
    if record.memory == "file":
        return dataclasses.replace(launch, ram=snapshot.blob_path(RAM_BLOB), ram_shared=False)
    if not any("memory-backend" in arg for arg in record.signature):
        return dataclasses.replace(launch, ram=None)
    return launch


def _cpu_of(launch: QemuLaunch, record: SnapshotRecord) -> QemuLaunch:
    """The CPU a full restore (or live migration) gives the guest: the one it booted with.
    A guest booted before x86_64 TCG VMs got ``+arat`` (no ``-cpu`` in its signature)
    chose its timers then; it gets the same CPU again, so its signature still matches."""
    if "-cpu" not in record.signature:
        return dataclasses.replace(launch, arat=False)
    return launch


def _signature_mismatch(recorded: Sequence[str], here: Sequence[str]) -> str:
    only_then = [arg for arg in recorded if arg not in here]
    only_now = [arg for arg in here if arg not in recorded]
    return (
        f"QEMU devices: the snapshot's VM was started with {only_then or 'the same options'}"
        f", a restore here would use {only_now or 'the same options in another order'}; "
        f"restore it with the Kelpie version that took it"
    )
