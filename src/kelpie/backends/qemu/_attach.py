"""Re-attaching to a QEMU an earlier process started, and undoing its interrupted snapshot.

:meth:`QemuAttach.attach` finds QEMU again from the VM directory (after a daemon restart,
say). A full snapshot pauses the guest, so the process taking it must not die half-way
unnoticed: before it pauses, it writes ``snapshot-in-progress.json`` (whether the guest
ran, whether to resume it, the snapshot's partial directory), removed once the guest is
back as it should be. An attach finding that marker (the process died mid-snapshot: a
daemon SIGKILLed, say) cancels the migration QEMU may still be writing, waits until QEMU
has left it, resumes the guest if the snapshot would have, and removes the partial snapshot
and the marker: the snapshot was never published, and the VM is as before it. A live
migration's sender leaves ``live-send-in-progress.json`` the same way (see ``_live``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Self

from kelpie._paths import vms_dir
from kelpie.agent import check_vm_id, read_vm_record
from kelpie.backends.qemu import _migration
from kelpie.backends.qemu._accel import AccelChoice
from kelpie.backends.qemu._host import QMP_DEAD, QMP_RUNNING, state_for_qmp_status
from kelpie.backends.qemu._live import SEND_MARKER, recover_send
from kelpie.backends.qemu._machine import ATTACH_TIMEOUT, SNAPSHOT_MARKER, QemuMachine
from kelpie.guestkit import GuestKit
from kelpie.hostnet import HostNetworkError, SandboxNetwork
from kelpie.vm import PARTIAL_SUFFIX, VmError, VmState

_log = logging.getLogger(__name__)


def read_snapshot_marker(path: Path) -> dict[str, Any]:
    """The snapshot marker's content; empty when it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class QemuAttach(QemuMachine):
    """A QemuMachine that can be found again from its VM directory by another process."""

    @classmethod
    async def attach(
        cls,
        vm_id: str,
        *,
        workdir: Path | None = None,
        kit: GuestKit | None = None,
        timeout: float = ATTACH_TIMEOUT,
    ) -> Self:
        """Reconnect to a VM that an earlier process started, from its VM directory.

        The directory is ``workdir``, else ``vms_dir() / vm_id``. The VM comes back RUNNING
        or PAUSED, as QEMU reports it, with :attr:`agent_info` listing the execs still held
        by the guest agent (for a PAUSED VM the agent answers after :meth:`resume`). When
        its QEMU is gone (or the pid file names another process) the VM comes back
        CRASHED with ``crash_reason`` saying why; ``stop()`` then cleans up its sockets.

        Raises :class:`VmError` when the directory holds no Kelpie VM, and when QEMU runs
        but does not answer within ``timeout`` seconds (QEMU is then left running).
        """
        check_vm_id(vm_id)
        directory = workdir or vms_dir() / vm_id
        config = read_vm_record(directory, vm_id, cls.backend_name)
        vm = cls(config, vm_id=vm_id, workdir=directory, kit=kit)
        launch = vm._launch_record()
        if launch.get("accel") in ("kvm", "tcg"):
            vm.accel = AccelChoice(str(launch["accel"]), "recorded when the VM started")
        if isinstance(launch.get("guestkit_digest"), str):
            vm._kit_digest = launch["guestkit_digest"]
        await vm._reattach(timeout)
        if vm.state in (VmState.RUNNING, VmState.PAUSED) and SandboxNetwork.needed(config):
            # its namespace outlived the process that started it; its helper may not have
            try:
                await vm.network.up(config)
            except HostNetworkError as exc:
                _log.warning("VM %s: %s (its DNS and published ports may not answer)",
                             vm_id, exc)
        return vm

    def _vmm_gone_cleanup(self) -> None:
        self._drop_interrupted_snapshot()  # no QEMU writes it any more
        self._drop_ram_file()  # nor uses its memory

    async def _reconnect(self, timeout: float) -> tuple[VmState, str]:
        """Connect QMP, read the run status, connect the agent; hello if the guest runs."""
        deadline = time.monotonic() + timeout
        self._qmp = await self._before_exit(
            self._connect_qmp(), "the QMP greeting (is another process attached?)", deadline,
            timeout,
        )
        status = await self._before_exit(
            self._qmp_status(), "QMP query-status", deadline, timeout
        )
        if (self.workdir / SEND_MARKER).exists():
            await self._before_exit(
                recover_send(self.id, self._qmp, self.workdir / SEND_MARKER),
                "recovering from an interrupted live migration", deadline, timeout,
            )
            status = await self._before_exit(self._qmp_status(), "QMP query-status",
                                             deadline, timeout)
        if (self.workdir / SNAPSHOT_MARKER).exists():
            status = await self._before_exit(
                self._recover_snapshot(), "recovering from an interrupted snapshot", deadline,
                timeout,
            )
        await self._before_exit(self.agent.connect(timeout), "the agent socket", deadline,
                                timeout)
        if status == QMP_RUNNING:
            await self._before_exit(
                self.agent.hello(), "the agent's hello (is another process attached?)",
                deadline, timeout,
            )
        return (state_for_qmp_status(status),
                f"the guest will not run again: QMP reports status {status!r}")

    async def _qmp_status(self) -> str:
        assert self._qmp is not None
        reply = await self._qmp.execute("query-status")
        return str(reply["status"]) if isinstance(reply, dict) else "unknown"

    async def _recover_snapshot(self) -> str:
        """Undo a full snapshot whose process died before it ended; return the QMP status.

        The marker says whether the snapshot would have resumed the guest. The migration
        QEMU may still be writing is cancelled first (a guest must not run while QEMU
        copies its memory: the snapshot would be torn), then the guest is brought back to
        running or paused, then the partial snapshot and the marker are removed. Should a
        step fail, the marker stays, so a later attach tries again.
        """
        assert self._qmp is not None
        marker = read_snapshot_marker(self.workdir / SNAPSHOT_MARKER)
        resume = marker.get("resume") is not False  # unreadable: it paused a running guest
        try:
            ended = await _migration.abandon_save(self._qmp)
        except _migration.MigrationFailed as exc:
            raise VmError(
                f"VM {self.id}: cannot undo the full snapshot interrupted by the exit of the "
                f"process taking it: {exc}"
            ) from exc
        status = await self._qmp_status()
        if status not in QMP_DEAD:
            if resume and status != QMP_RUNNING:
                await self._qmp.execute("cont")  # also re-activates disks after postmigrate
            elif not resume and status == QMP_RUNNING:
                await self._qmp.execute("stop")
            status = await self._qmp_status()
        self.recovered_snapshot = str(marker.get("dest") or "?")
        _log.warning(
            "VM %s: the process taking snapshot %s (pid %s) exited before it ended; its "
            "migration ended %r; the guest is %s again and the partial snapshot is removed",
            self.id, self.recovered_snapshot, marker.get("pid", "?"), ended, status,
        )
        await asyncio.to_thread(self._drop_interrupted_snapshot, marker)
        return status

    def _drop_interrupted_snapshot(self, marker: dict[str, Any] | None = None) -> None:
        """Remove an interrupted snapshot's partial directory (never published) and marker.

        Only once no QEMU can write it any more: its migration ended, or QEMU is gone.
        """
        path = self.workdir / SNAPSHOT_MARKER
        if marker is None:
            if not path.exists():
                return
            marker = read_snapshot_marker(path)
        partial = marker.get("partial")
        if isinstance(partial, str):
            where = Path(partial)
            if where.name.startswith(".") and where.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(where, ignore_errors=True)
        path.unlink(missing_ok=True)

