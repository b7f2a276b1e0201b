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
* :mod:`._host`, :mod:`._cmdline`, :mod:`._migration`, :mod:`._snapshot`: what the classes
  use (QEMU's version and identity, its command line, the QMP sequences, the snapshot
  record).
"""

from __future__ import annotations

import functools
from pathlib import Path

from kelpie.backends.qemu._attach import QemuAttach
from kelpie.backends.qemu._restore import QemuRestorer
from kelpie.backends.qemu._save import QemuSaver
from kelpie.vm import SnapshotKind, VmSnapshot


class QemuVm(QemuAttach):
    """A micro-VM run by QEMU: boot, attach, snapshots and restores; guest work via its agent."""

    @functools.cached_property
    def _saver(self) -> QemuSaver:
        return QemuSaver(self)

    @functools.cached_property
    def _restorer(self) -> QemuRestorer:
        return QemuRestorer(self)

    async def snapshot(
        self, dest: Path, *, kind: SnapshotKind = SnapshotKind.FULL, leave_paused: bool = False
    ) -> VmSnapshot:
        """Write a snapshot of this VM to the new directory ``dest`` (see the base class).

        While a full snapshot is taken, ``snapshot-in-progress.json`` in the VM directory
        says so, written before the guest pauses and removed once it is back as it should
        be: if this process dies in between, :meth:`attach` undoes the snapshot.
        """
        with self._saver.taking(dest, kind, leave_paused):
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
