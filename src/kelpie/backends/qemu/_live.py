"""Live migration of a running QEMU VM into another QEMU: the disk by NBD mirror, the rest
by QMP ``migrate``, the guest running all along but for the switchover (under KVM; under
TCG it is paused while its RAM is copied, see :func:`_logs_every_write`).

The target (:class:`LiveReceiver`) starts QEMU with ``-incoming defer`` over a new, empty
overlay on the same base image, exports its root disk writable over NBD and listens for the
migration stream, both on unix sockets in its VM directory. The source (:class:`LiveSender`)
mirrors its disk onto that export (``sync: top``: only the overlay's data, since the target
has the same base; the mirror then copies every write as the guest makes it), and once the
mirror is ready migrates the VM with the ``pause-before-switchover`` capability: when QEMU
has stopped the guest for the switchover, the mirror is completed (``block-job-cancel`` of a
ready job: the last writes are copied, the target stays as it is) and removed before QEMU
sends the device state, so the target's disk is complete when its guest first runs.
Everything crosses the two sockets as plain byte streams, so a relay may carry them.

The source ends paused (``postmigrate``; ``cont`` runs it again); a failed or unconverged
migration is undone and leaves it running. The target resumes its guest, reconnects the
agent and resyncs the guest's clock and RNG like a restore.

While the source sends, ``live-send-in-progress.json`` in its VM directory says so: should
the sending process die, QEMU would hold the guest at the switchover forever. An attach
finding the marker (:func:`recover_send`) undoes the migration unless it completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from kelpie.backends.qemu import _migration, _snapshot
from kelpie.backends.qemu._cmdline import (
    ROOT_DRIVE,
    QemuLaunch,
    cpu_model,
    device_signature,
)
from kelpie.backends.qemu._liveplan import LivePlan
from kelpie.backends.qemu._machine import OVERLAY, PENDING_RESYNC, QemuMachine
from kelpie.backends.qemu._restore import QemuRestorer, _cpu_of, _signature_mismatch
from kelpie.backends.qemu._snapshot import SnapshotRecord
from kelpie.vm import (
    ConfigError,
    LiveEndpoints,
    LiveMigrationDidNotConverge,
    LiveMigrationFailed,
    LiveProgress,
    LiveProgressCallback,
    LiveStats,
    SnapshotIncompatible,
    SnapshotKind,
)

"""The root disk's drive id on the command line (see ``_cmdline``), also the NBD export."""
NBD_NODE = "kelpie-live-target"
MIRROR_JOB = "kelpie-live-mirror"
NBD_SOCKET = "nbd.sock"
MIGRATION_SOCKET = "migration.sock"
DEFAULT_DOWNTIME_LIMIT_MS = 300
"""QEMU's own default: it switches over once the rest fits in this pause at the measured rate."""
SETTLE_TIMEOUT = 10.0
"""Seconds for a mirror job to end once cancelled, and for QEMU to leave a migration."""
SEND_MARKER = "live-send-in-progress.json"
"""In a source's VM directory while it sends (see :func:`recover_send`)."""
_POLL = 0.05
_JOB_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")

Progress = LiveProgressCallback
_log = logging.getLogger(__name__)


class LiveSender:
    """Sends one running QEMU VM live to a target that listens (see :class:`LiveReceiver`)."""

    def __init__(self, vm: QemuMachine) -> None:
        self._vm = vm

    async def plan(self, record: SnapshotRecord) -> LivePlan:
        """What the target must know: ``record`` (the VM's full snapshot record) and host."""
        vm = self._vm
        digest = None
        if record.base_path is not None:
            try:
                digest = await asyncio.to_thread(_snapshot.file_digest, record.base_path)
            except OSError as exc:
                raise LiveMigrationFailed(
                    f"VM {vm.id}: cannot read its base image {record.base_path}: {exc}"
                ) from exc
        host = vm.host_info()
        return LivePlan(
            record=record, backend_version=host.backend_version, arch=host.arch,
            cpu_model=cpu_model(host.arch, record.accel), machine=host.machine,
            guestkit_digest=vm._kit_digest, base_image_digest=digest, vm_id=vm.id,
        )

    async def send(
        self, nbd_socket: Path | None, migration_socket: Path, *, converge_timeout: float,
        progress: Progress | None, bandwidth: int, disk_bandwidth: int, downtime_limit_ms: int,
    ) -> LiveStats:
        """Mirror the disk, migrate, complete the mirror at switchover; the source ends paused.

        ``converge_timeout`` bounds the time until the switchover (the mirror's first copy
        and the RAM passes); past it the migration is cancelled
        (:class:`LiveMigrationDidNotConverge`). Any failure undoes what was set up and leaves
        the guest running.
        """
        vm = self._vm
        qmp = vm._qmp
        if qmp is None or not vm._vmm_running():
            raise vm._vmm_gone_error("live migration")
        if nbd_socket is None and vm.config.root_disk is not None:
            raise ConfigError([
                f"VM {vm.id} has a root disk: a live migration needs the target's NBD socket "
                f"to mirror it to (LiveEndpoints.nbd_socket of a target with the same disk)"
            ], what="live migration")
        report = progress or (lambda _: None)
        deadline = time.monotonic() + converge_timeout
        run = _SendRun(vm.id, qmp, report, deadline, converge_timeout)
        marker = vm.workdir / SEND_MARKER
        write_send_marker(marker, nbd_socket, migration_socket)
        mirror_to = None if vm.config.root_disk is None else nbd_socket
        try:
            return await self._send(run, mirror_to, migration_socket, bandwidth,
                                    disk_bandwidth, downtime_limit_ms)
        finally:
            marker.unlink(missing_ok=True)  # the outcome is settled either way

    async def _send(
        self, run: _SendRun, mirror_to: Path | None, migration_socket: Path, bandwidth: int,
        disk_bandwidth: int, downtime_limit_ms: int,
    ) -> LiveStats:
        """The steps of :meth:`send`; ``mirror_to``: the NBD socket (None: no disk)."""
        vm, qmp, report = self._vm, run.qmp, run.report
        started = time.monotonic()
        listener = EventListener(names=_JOB_EVENTS)
        migration_events = EventListener(names=("MIGRATION",))
        with qmp.listen(listener, migration_events):
            try:
                await _set_capabilities(qmp, switchover_pause=True)
                await qmp.execute("migrate-set-parameters", {
                    "max-bandwidth": bandwidth, "downtime-limit": downtime_limit_ms,
                })
                if mirror_to is not None:
                    await run.start_mirror(mirror_to, disk_bandwidth)
                    await run.mirror_ready(listener)
                paused_at: float | None = None
                if not _logs_every_write(vm):
                    await qmp.execute("stop")
                    paused_at = time.monotonic()
                run.migrating = True
                await qmp.execute("migrate", {"uri": f"unix:{migration_socket}"})
                await run.until_switchover(migration_events, listener if mirror_to else None)
                paused_at = paused_at or time.monotonic()
                report(LiveProgress("switchover", 0, 0))  # the guest is paused from here
                disk_bytes = await run.complete_mirror(listener) if mirror_to else 0
                await qmp.execute("migrate-continue", {"state": "pre-switchover"})
                info = await run.until_completed()
            except BaseException as exc:
                await asyncio.shield(run.undo())
                if isinstance(exc, QMPError | OSError):
                    if not vm._vmm_running():
                        raise vm._vmm_gone_error("live migration") from exc
                    raise LiveMigrationFailed(_failure(vm.id, str(exc))) from exc
                raise
            finally:
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await _set_capabilities(qmp, switchover_pause=False)
        ended = time.monotonic()
        ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
        assert isinstance(ram, dict)
        downtime = info.get("downtime")
        return LiveStats(
            total_seconds=ended - started,
            downtime_ms=int(downtime) if isinstance(downtime, int) else None,
            switchover_ms=(ended - paused_at) * 1000,
            ram_transferred=int(ram.get("transferred") or 0),
            disk_mirrored=disk_bytes,
        )


@dataclasses.dataclass
class _SendRun:
    """One :meth:`LiveSender.send`: the steps, and what to undo if it fails."""

    vm_id: str
    qmp: QMPClient
    report: Progress
    deadline: float
    converge_timeout: float
    node_added: bool = False
    mirroring: bool = False
    migrating: bool = False

    async def start_mirror(self, nbd_socket: Path, speed: int) -> None:
        await self.qmp.execute("blockdev-add", {
            "driver": "nbd", "node-name": NBD_NODE, "export": ROOT_DRIVE,
            "server": {"type": "unix", "path": str(nbd_socket)},
        })
        self.node_added = True
        # sync top: only what the overlay holds; the target's overlay has the same base.
        await self.qmp.execute("blockdev-mirror", {
            "job-id": MIRROR_JOB, "device": ROOT_DRIVE, "target": NBD_NODE, "sync": "top",
            "speed": speed,
        })
        self.mirroring = True

    async def _mirror_job(self, listener: EventListener) -> dict[str, Any]:
        """The mirror job's ``query-block-jobs`` entry; LiveMigrationFailed once it ended."""
        jobs = await self.qmp.execute("query-block-jobs")
        for job in jobs if isinstance(jobs, list) else ():
            if isinstance(job, dict) and job.get("device") == MIRROR_JOB:
                return job
        self.mirroring = False
        reason = "it ended"
        for event in listener.clear():
            data = event.get("data")
            if isinstance(data, dict) and data.get("device") == MIRROR_JOB:
                reason = str(data.get("error") or "it ended")
        raise LiveMigrationFailed(
            f"VM {self.vm_id}: the disk mirror to the target stopped: {reason}; the source "
            f"runs on (is the target's NBD socket, or the relay to it, still there?)"
        )

    async def mirror_ready(self, listener: EventListener) -> None:
        """Wait until the mirror's first copy is done (the job is ``ready``)."""
        while True:
            job = await self._mirror_job(listener)
            done, total = int(job.get("offset", 0)), int(job.get("len", 0))
            self.report(LiveProgress("disk", done, max(total - done, 0)))
            if job.get("ready"):
                return
            self._check_deadline(f"the disk mirror had copied {done} of {total} bytes")
            await asyncio.sleep(_POLL)

    async def until_switchover(
        self, events: EventListener, jobs: EventListener | None
    ) -> None:
        """Follow the migration until QEMU paused the guest for the switchover.

        The guest waits for us from then on, so the pause is seen by its event (not the
        next poll); the polls between report progress and watch the deadline and mirror.
        """
        while True:
            info = await self.qmp.execute("query-migrate")
            assert isinstance(info, dict)
            status = str(info.get("status"))
            if status == "pre-switchover":
                return
            if status in _migration.TERMINAL:
                self.migrating = False
                raise LiveMigrationFailed(_failure(
                    self.vm_id, str(info.get("error-desc") or f"the migration was {status}")
                ))
            ram = info.get("ram") if isinstance(info.get("ram"), dict) else None
            if isinstance(ram, dict):
                done, remaining = int(ram.get("transferred", 0)), int(ram.get("remaining", 0))
                self.report(LiveProgress("memory", done, remaining))
                what = f"{remaining} bytes of RAM were left after {done} sent"
            else:
                what = f"the migration was still in {status}"
            if jobs is not None:
                await self._mirror_job(jobs)  # a mirror that died fails the migration
            self._check_deadline(what)
            # The next query says which status came, and what went wrong.
            await _status_event(events, ("pre-switchover", *_migration.TERMINAL))

    def _check_deadline(self, what: str) -> None:
        if time.monotonic() >= self.deadline:
            raise LiveMigrationDidNotConverge(
                f"VM {self.vm_id}: the live migration did not reach its switchover within "
                f"{self.converge_timeout:g}s ({what}); it was cancelled and the source runs "
                f"on. Give it more time or bandwidth, or pause the guest's busiest work"
            )

    async def complete_mirror(self, listener: EventListener) -> int:
        """With the guest paused: let the mirror copy its last writes, end it, drop the
        NBD node. Returns the bytes the mirror wrote."""
        await self._mirror_job(listener)  # still there, so still in sync
        await self.qmp.execute("block-job-cancel", {"device": MIRROR_JOB})
        data = await self._job_end(listener)
        self.mirroring = False
        if data.get("error"):
            raise LiveMigrationFailed(
                f"VM {self.vm_id}: the disk mirror failed at the switchover: {data['error']}"
            )
        await self.qmp.execute("blockdev-del", {"node-name": NBD_NODE})
        self.node_added = False
        return int(data.get("offset", 0))

    async def _job_end(self, listener: EventListener) -> dict[str, Any]:
        async with asyncio.timeout(SETTLE_TIMEOUT):
            async for event in listener:
                data = event.get("data")
                if isinstance(data, dict) and data.get("device") == MIRROR_JOB:
                    return data
        raise LiveMigrationFailed("QMP closed before the mirror ended")  # pragma: no cover

    async def until_completed(self) -> dict[str, Any]:
        """After ``migrate-continue``: the device state goes; wait for ``completed``."""
        while True:
            info = await self.qmp.execute("query-migrate")
            assert isinstance(info, dict)
            status = str(info.get("status"))
            if status == "completed":
                self.migrating = False
                await _migration._settled(self.qmp)  # finish-migrate -> postmigrate
                return info
            if status in _migration.TERMINAL:
                raise LiveMigrationFailed(_failure(
                    self.vm_id, str(info.get("error-desc") or f"the migration was {status}")
                ))
            await asyncio.sleep(_POLL / 5)

    async def undo(self) -> None:
        """Cancel the migration and the mirror, drop the NBD node, run the guest again.

        Each step is tried even when an earlier one failed (best effort: this runs while
        an error or a cancellation propagates).
        """
        qmp = self.qmp
        errors = (QMPError, OSError, EOFError)
        if self.migrating:
            with contextlib.suppress(*errors):
                await _migration._cancel(qmp)
                await _migration._settled(qmp)
        if self.mirroring:
            with contextlib.suppress(*errors):
                with contextlib.suppress(QMPError):  # it may have ended since
                    await qmp.execute("block-job-cancel", {"device": MIRROR_JOB, "force": True})
                settle = time.monotonic() + SETTLE_TIMEOUT
                while time.monotonic() < settle:  # no event for a job that already ended
                    if not await _has_job(qmp, MIRROR_JOB):
                        break
                    await asyncio.sleep(_POLL / 5)
        if self.node_added:
            with contextlib.suppress(*errors):
                await qmp.execute("blockdev-del", {"node-name": NBD_NODE})
        with contextlib.suppress(*errors):
            # A migration cancelled at its switchover restarts the guest itself; if it did
            # not (or the switchover had passed), cont re-activates the disks and runs it.
            status = await qmp.execute("query-status")
            if isinstance(status, dict) and status.get("status") in ("paused", "postmigrate"):
                await qmp.execute("cont")


def write_send_marker(path: Path, nbd_socket: Path | None, migration_socket: Path) -> None:
    """Say that this process sends the VM live (not fsynced: it guards against the death
    of this process, not of the host, which QEMU would not survive either)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({
        "pid": os.getpid(), "nbd": None if nbd_socket is None else str(nbd_socket),
        "migration": str(migration_socket),
    }) + "\n")
    temporary.replace(path)


async def recover_send(vm_id: str, qmp: QMPClient, marker: Path) -> None:
    """Undo a live send whose process died (found by an attach); the marker goes last.

    A migration that completed is left so: the target may run the guest now, and only
    the coordinator knows (the source stays paused; ``resume`` runs it). Anything else is
    cancelled with its mirror and NBD node, and the guest runs again.
    """
    info = await qmp.execute("query-migrate")
    status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
    if status != "completed":
        await _SendRun(vm_id, qmp, lambda _: None, 0.0, 0.0, node_added=True, mirroring=True,
                       migrating=True).undo()
    with contextlib.suppress(QMPError):
        await _set_capabilities(qmp, switchover_pause=False)
    _log.warning(
        "VM %s: the process sending it live exited before the end; its migration was %r "
        "(%s)", vm_id, status,
        "the source stays paused" if status == "completed" else "undone, the guest runs again",
    )
    await asyncio.to_thread(marker.unlink, True)  # missing_ok


def _logs_every_write(vm: QemuMachine) -> bool:
    """Whether QEMU's dirty-page log sees every write of the running guest, so RAM can be
    copied while it runs.

    Not under TCG: a guest store through a TLB entry TCG cached before the log was last
    synced is not logged (QEMU marks a page dirty on the first store after a TLB fill), so
    pages the guest keeps writing (timer structures, the page cache) reach the target stale:
    measured here on QEMU 7.2, a live-migrated guest's kernel oopsed or its files held zeros
    within a few migrations, never with the guest paused for the RAM copy. An unknown
    accelerator is taken for TCG.
    """
    return vm.accel is not None and vm.accel.accel != "tcg"


async def _status_event(events: EventListener, wanted: tuple[str, ...]) -> None:
    """Wait one poll interval, less if a MIGRATION event with a ``wanted`` status comes."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_POLL):
            async for event in events:
                data = event.get("data")
                if isinstance(data, dict) and data.get("status") in wanted:
                    return


async def _has_job(qmp: QMPClient, job_id: str) -> bool:
    jobs = await qmp.execute("query-block-jobs")
    return any(isinstance(j, dict) and j.get("device") == job_id
               for j in (jobs if isinstance(jobs, list) else ()))


async def _set_capabilities(qmp: QMPClient, *, switchover_pause: bool) -> None:
    # x-ignore-shared off, always: a VM restored from a snapshot (a template's sandbox)
    # loaded its state with it on, and the target refuses a stream that claims it
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True},
        {"capability": "pause-before-switchover", "state": switchover_pause},
        {"capability": "x-ignore-shared", "state": False},
    ]})


def _failure(vm_id: str, reason: str) -> str:
    message = f"VM {vm_id}: the live migration failed: {reason}; the source runs on"
    if "VirtFS" in reason or "9p" in reason:
        message += (
            " (QEMU cannot migrate a VM with a mounted shared directory, virtio-9p: "
            "unmount it in the guest or run without mounts)"
        )
    return message


class LiveReceiver:
    """Receives a live migration into one new QEMU VM: checks, listens, then resumes it."""

    def __init__(self, vm: QemuMachine) -> None:
        self._vm = vm

    async def prepare(self, plan: LivePlan) -> QemuLaunch:
        """Everything that can refuse the plan, before the VM directory changes: the base
        image (by digest), the host (as a restore checks it), the device signature."""
        vm = self._vm
        record = plan.record
        base = None
        if record.base_path is not None:
            if plan.base_image_digest is None:
                raise SnapshotIncompatible(["the live plan names no digest for its base image"])
            candidates = [p for p in (vm.config.root_disk, record.base_path) if p is not None]
            base = await asyncio.to_thread(
                _snapshot.find_base_image, plan.base_image_digest, candidates
            )
        config = _snapshot.restored_config(record.config, vm.config, SnapshotKind.FULL, base)
        if config.hostname is None:  # the guest moves, so its name goes with it
            config = config.evolve(hostname=record.hostname)
        launch = _cpu_of(await vm._prepare_launch(config, incoming=True), record)
        plan.manifest().check_restorable(vm.host_info())
        signature = tuple(device_signature(dataclasses.replace(
            launch, overlay=None if base is None else vm.workdir / OVERLAY,
        )))
        if signature != record.signature:
            raise SnapshotIncompatible([_signature_mismatch(record.signature, signature)])
        return launch

    async def listen(self, launch: QemuLaunch, plan: LivePlan) -> LiveEndpoints:
        """Start QEMU waiting for the migration, with its NBD export of the new overlay."""
        vm = self._vm
        vm._prepare_workdir(launch)
        vm._config = launch.config
        for name in (NBD_SOCKET, MIGRATION_SOCKET):
            (vm.workdir / name).unlink(missing_ok=True)
        (vm.workdir / OVERLAY).unlink(missing_ok=True)  # sync top needs an empty overlay
        launch = dataclasses.replace(launch, overlay=await vm._prepare_overlay())
        # Without a root disk nothing listens on the NBD socket, and the source never
        # connects to it.
        endpoints = LiveEndpoints(vm.workdir / NBD_SOCKET, vm.workdir / MIGRATION_SOCKET)
        await vm._spawn_qemu(launch)
        deadline = time.monotonic() + vm.boot_timeout
        qmp = await vm._before_exit(vm._connect_qmp(), "the QMP socket", deadline)
        vm._qmp = qmp
        if launch.overlay is not None:
            await vm._before_exit(_export_disk(qmp, endpoints.nbd_socket),
                                  "the NBD export of the root disk", deadline)
        await vm._before_exit(
            qmp.execute("migrate-incoming", {"uri": f"unix:{endpoints.migration_socket}"}),
            "QMP migrate-incoming", deadline,
        )
        renamed = launch.hostname != plan.record.hostname
        resync = {"hostname": launch.hostname if renamed else None}
        (vm.workdir / PENDING_RESYNC).write_text(json.dumps(resync) + "\n")
        return endpoints

    async def finish(self, timeout: float) -> None:
        """Wait for the migration to complete, end the export, run the guest, resync it."""
        vm = self._vm
        qmp = vm._qmp
        if qmp is None or not vm._vmm_running():
            raise vm._vmm_gone_error("the end of a live migration")
        deadline = time.monotonic() + timeout
        await vm._before_exit(_incoming_done(vm.id, qmp), "the incoming live migration",
                              deadline, timeout)
        if vm.config.root_disk is not None:
            await vm._before_exit(qmp.execute("nbd-server-stop"), "QMP nbd-server-stop",
                                  deadline, timeout)
        # Connected before the guest runs, as after a restore (see QemuRestorer).
        await vm._before_exit(vm.agent.connect(timeout), "the agent socket", deadline, timeout)
        await vm._before_exit(qmp.execute("cont"), "QMP cont", deadline, timeout)
        await vm._before_exit(vm.agent.hello(), "the guest agent's hello", deadline, timeout)
        await vm._before_exit(QemuRestorer(vm).finish(), "the guest agent's resync",
                              deadline, timeout)
        for name in (NBD_SOCKET, MIGRATION_SOCKET):
            (vm.workdir / name).unlink(missing_ok=True)


async def _export_disk(qmp: QMPClient, socket: Path) -> None:
    await qmp.execute("nbd-server-start", {
        "addr": {"type": "unix", "data": {"path": str(socket)}},
    })
    await qmp.execute("nbd-server-add", {
        "device": ROOT_DRIVE, "name": ROOT_DRIVE, "writable": True,
    })


async def _incoming_done(vm_id: str, qmp: QMPClient) -> None:
    while True:
        info = await qmp.execute("query-migrate")
        status = str(info.get("status")) if isinstance(info, dict) else "none"
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            assert isinstance(info, dict)
            raise LiveMigrationFailed(
                f"VM {vm_id}: the incoming live migration {status}: "
                f"{info.get('error-desc') or 'QEMU gave no reason (see qemu.log)'}"
            )
        await asyncio.sleep(_POLL / 5)
