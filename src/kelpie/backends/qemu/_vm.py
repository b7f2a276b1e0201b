"""QemuVm: a real micro-VM under QEMU (``microvm`` machine, KVM when proven, else TCG).

The guest's commands and files go through the guest agent (:class:`kelpie.agent.AgentVm`);
QEMU's own parts are split by concern, one class per module:

* :mod:`._machine`: the QEMU process, its launch and QMP channel, pause, resume and stop
  (and the VM directory's layout) (:class:`QemuMachine`);
* :mod:`._attach`: finding a QEMU another process started, and undoing the full snapshot
  that process was taking when it died (:class:`QemuAttach`, a QemuMachine);
* :mod:`._save`: full (QMP migration to a file) and disk (overlay) snapshots
  (:class:`QemuSaver`, which a QemuVm holds);
* :mod:`._restore`: restoring full, disk and checkpoint snapshots (:class:`QemuRestorer`,
  which a QemuVm holds);
* :mod:`._live`: live migration to another QEMU, the sending and the receiving half
  (:class:`LiveSender`, :class:`LiveReceiver`; what they exchange is in :mod:`._liveplan`);
* :mod:`._host`, :mod:`._cmdline`, :mod:`._migration`, :mod:`._snapshot`: what the classes
  use (QEMU's version and identity, its command line, the QMP sequences, the snapshot
  record).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kelpie.backends.qemu._attach import QemuAttach
from kelpie.backends.qemu._live import DEFAULT_DOWNTIME_LIMIT_MS, LiveReceiver, LiveSender
from kelpie.backends.qemu._liveplan import LivePlan
from kelpie.backends.qemu._migration import UNLIMITED_BANDWIDTH
from kelpie.backends.qemu._restore import QemuRestorer
from kelpie.backends.qemu._save import QemuSaver
from kelpie.vm import (
    InvalidStateError,
    LiveEndpoints,
    LiveProgressCallback,
    LiveStats,
    SnapshotKind,
    VmSnapshot,
    VmState,
)


class QemuVm(QemuAttach):
    """A micro-VM run by QEMU: boot, attach, snapshots and restores; guest work via its agent."""

    @functools.cached_property
    def _saver(self) -> QemuSaver:
        return QemuSaver(self)

    @functools.cached_property
    def _restorer(self) -> QemuRestorer:
        return QemuRestorer(self)

    async def snapshot(
        self, dest: Path, *, kind: SnapshotKind = SnapshotKind.FULL, leave_paused: bool = False,
        shareable: bool = False,
    ) -> VmSnapshot:
        """Write a snapshot of this VM to the new directory ``dest`` (see the base class).

        While a full snapshot is taken, ``snapshot-in-progress.json`` in the VM directory
        says so, written before the guest pauses and removed once it is back as it should
        be: if this process dies in between, :meth:`attach` undoes the snapshot.
        ``shareable``: the guest's RAM file is copied into the snapshot as a file (blob
        ``ram``, next to the device state) that every restore maps copy-on-write.
        """
        with self._saver.taking(dest, kind, leave_paused, shareable):
            return await super().snapshot(dest, kind=kind, leave_paused=leave_paused)

    async def _do_pause(self) -> None:
        self._saver.mark(running=True)  # before the guest stops, if a snapshot pauses it
        await super()._do_pause()

    async def _do_snapshot(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        return await self._saver.take(dest, kind)

    async def _do_resume(self) -> None:
        await super()._do_resume()
        await self._restorer.finish()

    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        await self._restorer.restore(snapshot, paused=paused)

    # ---- live migration (see _live; kelpie.vm.LiveMigratable) ---------------------------
    async def live_plan(self) -> LivePlan:
        """What the target of a live migration of this (running) VM must be told."""
        return await LiveSender(self).plan(await self._saver._snapshot_record(SnapshotKind.FULL))

    async def live_plan_document(self) -> dict[str, Any]:
        """:meth:`live_plan` as JSON-able data (for :meth:`receive_live_document`)."""
        return (await self.live_plan()).to_dict()

    async def receive_live_document(self, plan: Mapping[str, Any]) -> LiveEndpoints:
        """:meth:`receive_live` of a plan in its JSON-able form (``SnapshotCorrupted`` if
        it is not one)."""
        return await self.receive_live(LivePlan.from_dict(plan))

    async def send_live(
        self, nbd_socket: Path | None, migration_socket: Path, *, converge_timeout: float,
        progress: LiveProgressCallback | None = None, bandwidth: int = UNLIMITED_BANDWIDTH,
        disk_bandwidth: int = UNLIMITED_BANDWIDTH,
        downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS,
    ) -> LiveStats:
        """Move this running VM live to the target listening behind the two unix sockets
        (see :meth:`receive_live`); the VM ends PAUSED, the target holding the guest.

        :meth:`resume` runs it here again (the coordinator's abort), :meth:`stop` ends it
        (once the target committed). A failure, or no switchover within
        ``converge_timeout`` seconds (:class:`LiveMigrationDidNotConverge`), leaves it
        RUNNING as before. ``bandwidth`` (the RAM's stream) and ``disk_bandwidth`` (the
        disk mirror's) are in bytes per second.

        Under KVM the guest runs until the switchover; under TCG it is paused from the end
        of the disk mirror's first copy, while its RAM is copied (QEMU's dirty-page log
        misses TCG's writes through cached TLB entries: a guest copied while it runs would
        arrive corrupted).
        """
        async with self._lifecycle:
            if self._state is not VmState.RUNNING:
                raise InvalidStateError(self.id, "send a live migration", self._state,
                                        [VmState.RUNNING])
            with self._crash_guard():
                stats = await self._unless_gone(LiveSender(self).send(
                    nbd_socket, migration_socket, converge_timeout=converge_timeout,
                    progress=progress, bandwidth=bandwidth, disk_bandwidth=disk_bandwidth,
                    downtime_limit_ms=downtime_limit_ms,
                ), "live migration")
            self._set_state(VmState.PAUSED)
            return stats

    async def receive_live(self, plan: LivePlan) -> LiveEndpoints:
        """Make this new VM the target of a live migration described by ``plan``: QEMU
        waits for it (state STARTING) on the returned sockets. Then :meth:`finish_live`,
        or :meth:`abort_live`.

        Everything that can refuse the plan (base image by digest, host, devices) is
        checked before anything starts; the VM then stays CREATED.
        """
        async with self._lifecycle:
            if self._state is not VmState.CREATED:
                raise InvalidStateError(self.id, "receive a live migration", self._state,
                                        [VmState.CREATED])
            receiver = LiveReceiver(self)
            launch = await receiver.prepare(plan)
            self._set_state(VmState.STARTING)
            endpoints: list[LiveEndpoints] = []

            async def listen() -> None:
                endpoints.append(await receiver.listen(launch, plan))

            await self._run_startup(listen(), "receiving a live migration")
            return endpoints[0]

    async def finish_live(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) for the migration into this VM to complete,
        then run the guest and resync it: the VM ends RUNNING, its agent answering. If
        that fails the VM is stopped (STOPPED)."""
        async with self._lifecycle:
            if self._state is not VmState.STARTING:
                raise InvalidStateError(self.id, "finish a live migration", self._state,
                                        [VmState.STARTING])
            await self._run_startup(LiveReceiver(self).finish(timeout), "live migration")
            self._set_state(VmState.RUNNING)

    async def abort_live(self) -> None:
        """Give up a live migration into this VM: its QEMU is killed, the VM is STOPPED.

        Also while :meth:`finish_live` waits: that wait then fails at once (and stops the VM).
        """
        process = self._process
        if self._state is VmState.STARTING and process is not None and process.running:
            process.kill_group()  # no lock: finish_live may hold it, waiting for QEMU
        async with self._lifecycle:
            if self._state is VmState.STARTING:
                try:
                    await self._do_stop(force=True)
                finally:
                    self._set_state(VmState.STOPPED)
                return
        await self.stop(force=True)
