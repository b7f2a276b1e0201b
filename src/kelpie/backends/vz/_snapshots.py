"""Full snapshots and restores of a :class:`VzVm`, and its checkpoints.

A full snapshot is the framework's saved state of the paused VM (``saveMachineStateToURL``,
macOS 14 on Apple silicon) plus a copy of its writable disk; see :mod:`._record` for the
blobs and the record. A full restore creates a fresh machine with the saved kernel command
line, devices, machine identifier and MAC address, loads the state into it
(``restoreMachineStateFromURL``: the VM is then paused) and, once it runs, resyncs the
guest (clock, RNG reseed, host name). Checkpoints come from :mod:`kelpie.vm._checkpoint`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kelpie.backends.vz._bridge import VzError, machine_identity
from kelpie.backends.vz._disk import DISK_NAME, copy_file
from kelpie.backends.vz._launch import VzLaunch
from kelpie.backends.vz._record import DISK_BLOB, STATE_BLOB, VzRecord
from kelpie.vm import (
    ConfigError,
    SnapshotError,
    SnapshotIncompatible,
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

if TYPE_CHECKING:
    from kelpie.backends.vz._vm import VzVm

RESTORE_ENTROPY_BYTES = 64
"""Fresh host randomness a restored guest mixes into its kernel RNG (then reseeds)."""


@dataclasses.dataclass(frozen=True)
class _Resync:
    """A guest restored from a full snapshot, to resync once it runs."""

    hostname: str | None
    """The guest's new host name (None: it keeps the one it was saved with)."""


class VzSnapshots:
    """Takes and restores one VzVm's snapshots; resyncs a guest restored paused on resume."""

    def __init__(self, vm: VzVm) -> None:
        self._vm = vm
        self._pending: _Resync | None = None

    def forget(self) -> None:
        """The machine stopped: nothing is left to resync."""
        self._pending = None

    # ---- taking -------------------------------------------------------------------------
    async def take(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        """A full snapshot of the VM the base class paused, or a checkpoint of a running one."""
        if kind is SnapshotKind.CHECKPOINT:
            return await capture_checkpoint(self._vm, dest)
        vm = self._vm
        refusal = vm.save_restore_refusal("full snapshots")
        if refusal is not None:
            raise refusal
        machine, launch = vm.machine(), vm.launch
        if machine is None or launch is None or not machine.running:
            raise vm._vmm_gone_error("snapshot")
        machine_id, mac = machine_identity(machine.configuration)
        record = VzRecord(config=launch.config, hostname=launch.hostname,
                          command_line=launch.kernel_command_line(),
                          agent_port=launch.agent_port, machine_id=machine_id, mac_address=mac)
        with SnapshotWriter(dest) as writer:
            state = writer.blob_path(STATE_BLOB)
            try:
                await machine.save(state)
            except VzError as exc:
                if not machine.running:
                    raise vm._vmm_gone_error("snapshot") from exc
                raise SnapshotError(f"VM {vm.id}: Virtualization.framework could not save "
                                    f"the VM's state: {exc}") from exc
            with _storage_errors(f"the snapshot's state blob {state}"):
                await asyncio.to_thread(_sync_file, state)
                await asyncio.to_thread(writer.adopt_blob, STATE_BLOB)
            if launch.disk is not None:
                # The guest is paused: its disk does not change while it is copied.
                with _storage_errors(f"copying the disk {launch.disk} into the snapshot"):
                    await asyncio.to_thread(copy_file, launch.disk, writer.blob_path(DISK_BLOB))
                    await asyncio.to_thread(writer.adopt_blob, DISK_BLOB)
            host = vm.host_info()
            return writer.commit(
                kind=SnapshotKind.FULL, backend=host.backend,
                backend_version=host.backend_version, arch=host.arch,
                cpu_model=host.cpu_model, machine=host.machine, vcpus=launch.config.vcpus,
                memory_mib=launch.config.memory_mib, guestkit_digest=host.guestkit_digest,
                vm_id=vm.id, extra=record.to_extra(),
            )

    # ---- restoring ----------------------------------------------------------------------
    async def restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        if snapshot.manifest.kind is SnapshotKind.CHECKPOINT:
            await self._restore_checkpoint(snapshot, paused=paused)
        else:
            await self._restore_full(snapshot, paused=paused)

    async def _restore_full(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Everything that can refuse the snapshot is checked before the VM directory
        changes; then the disk, a fresh machine, and the saved state loaded into it."""
        vm = self._vm
        refusal = vm.save_restore_refusal("restoring full snapshots")
        if refusal is not None:
            raise refusal
        manifest = snapshot.manifest
        record = VzRecord.from_manifest(manifest)
        kit = await vm.guest_kit()
        if record.config.initrd is None and manifest.guestkit_digest not in (None, kit.digest):
            raise SnapshotIncompatible([
                f"guest kit: the snapshot's guest booted {manifest.guestkit_digest}, this "
                f"host has {kit.digest}; a saved state resumes only on the kernel it ran"
            ])
        if (DISK_BLOB in manifest.blobs) != (record.config.root_disk is not None):
            raise SnapshotIncompatible(["the snapshot's disk blob does not match its "
                                        "configuration's root disk"])
        config = restored_config(record.config, vm.config)
        problems = config.host_problems()  # the saved machine's shares must exist here
        if problems:
            raise ConfigError(problems)
        hostname = config.hostname or f"kelpie-{vm.id[:8]}"
        vm._interrupt_commands(
            f"VM {vm.id} was restored from snapshot {snapshot.path} while this command ran; "
            f"commands do not survive a restore: run it again")
        with vm.disk_set_aside():
            vm.use_config(config)
            vm.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            disk = None
            if DISK_BLOB in manifest.blobs:
                disk = vm.workdir / DISK_NAME
                with _storage_errors(f"installing the snapshot's disk as {disk}"):
                    await asyncio.to_thread(copy_file, snapshot.blob_path(DISK_BLOB), disk)
            launch = VzLaunch(
                config=config, kernel=config.kernel or kit.kernel,
                initrd=config.initrd or kit.initrd, hostname=hostname,
                console_log=vm.workdir / "console.log", disk=disk,
                agent_port=record.agent_port, machine_id=record.machine_id,
                mac_address=record.mac_address, command_line=record.command_line,
            )
            machine = await vm.create_machine(launch)
            try:
                await machine.restore(snapshot.blob_path(STATE_BLOB))
            except VzError as exc:
                raise SnapshotError(f"VM {vm.id}: Virtualization.framework could not restore "
                                    f"the snapshot {snapshot.path}: {exc}") from exc
            self._pending = _Resync(None if hostname == record.hostname else hostname)
            if not paused:
                await vm.machine_call(lambda m: m.resume(), "resume after the restore")
                await self.finish_restore()

    async def finish_restore(self) -> None:
        """Once a restored guest runs: reach its agent, then set its clock, reseed its RNG
        and rename it. A no-op unless a full restore is pending."""
        plan = self._pending
        if plan is None:
            return
        vm = self._vm
        await vm.greet(vm.boot_timeout, "the restore")
        await vm._call(lambda client: client.resync(
            epoch_ns=time.time_ns(), entropy=os.urandom(RESTORE_ENTROPY_BYTES),
            hostname=plan.hostname,
        ))
        self._pending = None

    async def _restore_checkpoint(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Boot fresh from this VM's own configuration (on a fresh copy of its image), then
        write the checkpoint's workspace into it (see :mod:`kelpie.vm._checkpoint`)."""
        vm = self._vm
        content = read_checkpoint(snapshot, vm)
        config = checkpoint_config(vm.config, content)
        with vm.disk_set_aside():
            vm.use_config(config)
            await vm.boot(await vm.prepare_launch(config))
            await replay_checkpoint(vm, content)
            if paused:
                await vm.machine_call(lambda m: m.pause(), "pause after the restore")


def restored_config(recorded: VmConfig, own: VmConfig) -> VmConfig:
    """The configuration a full restore runs with: the snapshot's machine and devices,
    which the saved state needs exactly; the restoring VM's host name and environment."""
    changes: dict[str, object] = {}
    if own.hostname:
        changes["hostname"] = own.hostname
    if own.env:
        changes["env"] = {**recorded.env, **own.env}
    return recorded.evolve(**changes)


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what}: {exc.strerror or exc}") from exc
