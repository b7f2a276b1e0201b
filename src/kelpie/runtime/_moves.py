"""Sandboxes leaving this runtime for another host, and arriving from one.

The runtime's half of a teleport (the coordinator is :mod:`kelpie.teleport`): capture a
sandbox's state for the move and keep anyone else from changing it meanwhile (a *hold*),
give it back if the move is rolled back, take an arriving sandbox in under its own id and
name, and let the departed one go once the target owns it.

A held sandbox refuses every lifecycle operation (pause, resume, start, stop, remove,
snapshot, restore): resuming it while its copy is restored elsewhere would run it twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kelpie.guestkit import host_arch
from kelpie.images import Platform, StoredImage, rootfs_ext4
from kelpie.runtime import _arguments as args
from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._db import IdInUse
from kelpie.runtime._errors import SandboxStateError
from kelpie.runtime._info import SandboxInfo
from kelpie.runtime._mains import MainCommands
from kelpie.runtime._sandboxes import Sandboxes
from kelpie.vm import (
    MIN_DISK_MIB,
    BackendSpec,
    ConfigError,
    LiveEndpoints,
    LiveMigratable,
    LiveProgressCallback,
    LiveStats,
    SnapshotKind,
    VmConfig,
    VmSnapshot,
    VmState,
)

_ID = re.compile(r"[0-9a-f]{3,64}")


def sandbox_record(info: SandboxInfo) -> dict[str, Any]:
    """The whole record of a sandbox as JSON: what another host needs to keep it as is."""
    return {
        "id": info.id, "name": info.name, "backend": info.backend,
        "vm": info.config.to_dict(), "image": info.image, "image_digest": info.image_digest,
        "workdir": info.workdir, "user": info.user, "labels": dict(info.labels),
        "created_at": info.created_at,
        "command": None if info.command is None else list(info.command),
        "image_command": None if info.image_command is None else list(info.image_command),
        "image_entrypoint": list(info.image_entrypoint),
        "main_exit_code": info.main_exit_code, "main_exec_id": info.main_exec_id,
        "main_output_offset": info.main_output_offset,
        "restart": str(info.restart), "restart_count": info.restart_count,
        "stop_timeout": info.stop_timeout, "base_disk_mib": _base_disk_mib(info),
        "expires_at": info.expires_at, "on_timeout": info.on_timeout,
    }


def _base_disk_mib(info: SandboxInfo) -> int | None:
    """The size the base of the sandbox's root disk was built at: its disk's size, or
    less when the disk grew since (a fork or a template's sandbox given a bigger disk)."""
    disk = info.config.root_disk
    if disk is None or not disk.is_file():
        return info.config.disk_mib
    return -(-disk.stat().st_size // (1 << 20))


def base_disk_mib(record: Mapping[str, Any]) -> int | None:
    """The size to build a :func:`sandbox_record`'s base disk at (None: sized to its
    image), on the host it moves to; its disk's size for records that do not say."""
    size = record.get("base_disk_mib")
    disk_mib = VmConfig.from_dict(record["vm"]).disk_mib
    if isinstance(size, int) and not isinstance(size, bool) and disk_mib is not None \
            and MIN_DISK_MIB <= size <= disk_mib:
        return size
    return disk_mib


def sandbox_from_record(data: dict[str, Any]) -> SandboxInfo:
    """The sandbox a :func:`sandbox_record` describes (state ``created``); a malformed
    record raises :class:`ConfigError` naming what is wrong."""
    try:
        command = data.get("command")
        image_command = data.get("image_command")
        if not _ID.fullmatch(str(data["id"])):
            raise ValueError(f"id {data['id']!r} is not 3 to 64 lowercase hex digits")
        return SandboxInfo(
            id=str(data["id"]), name=str(data["name"]), backend=str(data["backend"]),
            state=VmState.CREATED, config=VmConfig.from_dict(data["vm"]),
            image=data.get("image"), image_digest=data.get("image_digest"),
            workdir=data.get("workdir"), user=data.get("user"),
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
            created_at=float(data.get("created_at") or 0.0),
            command=None if command is None else tuple(str(a) for a in command),
            image_command=None if image_command is None else tuple(str(a) for a in image_command),
            image_entrypoint=tuple(str(a) for a in data.get("image_entrypoint") or ()),
            main_exit_code=data.get("main_exit_code"), main_exec_id=data.get("main_exec_id"),
            main_output_offset=_offset(data.get("main_output_offset")),
            restart=args.restart_policy(data.get("restart")),
            restart_count=max(0, int(data.get("restart_count") or 0)),
            stop_timeout=args.stop_timeout(data.get("stop_timeout")),
            expires_at=None if data.get("expires_at") is None else float(data["expires_at"]),
            on_timeout=args.on_timeout_action(data.get("on_timeout") or "remove"),
        )
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise ConfigError([f"the sandbox record is malformed: {exc!r}"],
                          what="teleported sandbox") from None


@dataclasses.dataclass(frozen=True)
class Capture:
    """A sandbox's state captured for a move, and how it was before."""

    info: SandboxInfo
    snapshot: VmSnapshot
    was_running: bool


class Moves:
    """Captures, holds, gives back, takes in and lets go of sandboxes that move hosts."""

    def __init__(self, ctx: RuntimeContext, sandboxes: Sandboxes, mains: MainCommands) -> None:
        self._ctx = ctx
        self._sandboxes = sandboxes
        self._mains = mains

    def record(self, sandbox_id: str) -> dict[str, Any]:
        """The whole record of a sandbox as JSON, as another host takes it in."""
        return sandbox_record(self._ctx.info(sandbox_id))

    def guestkit_of(self, sandbox_id: str) -> str | None:
        """The digest of the guest kit the sandbox's VM booted (None: unknown or none)."""
        vm = self._ctx.vms.get(sandbox_id)
        return None if vm is None else vm.host_info().guestkit_digest

    # ---- holds --------------------------------------------------------------------------
    def hold(self, sandbox_id: str, why: str) -> None:
        """Refuse lifecycle operations on the sandbox until :meth:`unhold` (``why`` says
        which move holds it). Raises :class:`SandboxMoving` if another move holds it: the
        check and the hold are one step, so two moves of one sandbox cannot both start.
        Holding again for the same move is a no-op."""
        ctx = self._ctx
        info = ctx.db.get(sandbox_id)  # (None: let go already, e.g. before a crash)
        if info is not None and ctx.held.get(sandbox_id, why) != why:
            ctx.check_not_held(info, "move")
        ctx.held[sandbox_id] = why

    def holder(self, sandbox_id: str) -> str | None:
        """Which move holds the sandbox (None: none)."""
        return self._ctx.held.get(sandbox_id)

    def unhold(self, sandbox_id: str) -> None:
        self._ctx.held.pop(sandbox_id, None)

    # ---- leaving ------------------------------------------------------------------------
    async def capture(self, sandbox_id: str, dest: Path, kind: SnapshotKind, *,
                      workspace: str | None = None) -> Capture:
        """Snapshot the held sandbox into ``dest`` and leave it paused, its main command's
        log complete (no more is written to it until :meth:`give_back`).

        A full snapshot pauses the guest first (and leaves it paused); a checkpoint is taken
        from the running guest through its agent, then the guest is paused.
        """
        ctx = self._ctx
        async with ctx.lock_for(sandbox_id):
            info = ctx.info(sandbox_id)
            vm = ctx.vms.get(info.id)
            if vm is None or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                raise SandboxStateError(args.label(info), "teleport", info.state,
                                        [VmState.RUNNING, VmState.PAUSED])
            was_running = vm.state is VmState.RUNNING
            if kind is SnapshotKind.CHECKPOINT:
                vm.checkpoint_workspace = workspace or args.workspace_of(info)
                if not was_running:
                    await vm.resume()
            snapshot = await vm.snapshot(dest, kind=kind, leave_paused=True)
            if vm.state is VmState.RUNNING:
                await vm.pause()
            self._mains.hold_output(sandbox_id)
        return Capture(ctx.info(sandbox_id), snapshot, was_running)

    def live_ready(self, sandbox_id: str) -> bool:
        """Whether the sandbox's VM can be moved live now (running, on a backend that can)."""
        vm = self._ctx.vms.get(sandbox_id)
        return vm is not None and vm.state is VmState.RUNNING and _live(vm) is not None

    def _live_vm(self, sandbox_id: str) -> LiveMigratable:
        ctx = self._ctx
        vm = _live(ctx.vms.get(sandbox_id))
        if vm is None:
            info = ctx.info(sandbox_id)
            raise ConfigError([f"sandbox {args.label(info)} runs on backend {info.backend}, "
                               "which cannot move a running VM live"], what="live teleport")
        return vm

    async def live_plan(self, sandbox_id: str) -> dict[str, Any]:
        """What a target must know to receive the held sandbox's VM live."""
        return await self._live_vm(sandbox_id).live_plan_document()

    async def send_live(self, sandbox_id: str, endpoints: LiveEndpoints, *,
                        converge_timeout: float,
                        progress: LiveProgressCallback | None = None) -> LiveStats:
        """Move the held sandbox's VM live to the target behind ``endpoints``; it ends paused
        here, its main command's log complete as in :meth:`capture` (or running as before,
        if the migration fails)."""
        vm = self._live_vm(sandbox_id)
        async with self._ctx.lock_for(sandbox_id):
            stats = await vm.send_live(endpoints.nbd_socket, endpoints.migration_socket,
                                       converge_timeout=converge_timeout, progress=progress)
            self._mains.hold_output(sandbox_id)
        return stats

    async def arrive_live(self, record: dict[str, Any],
                          plan: dict[str, Any]) -> tuple[SandboxInfo, LiveEndpoints]:
        """Take in a sandbox whose VM comes live: its record under its own id and name, and
        a new VM waiting for the migration (see :meth:`finish_live_arrival`)."""
        ctx = self._ctx
        info, spec, stored = await self._insert_arrival(record)
        async with ctx.lock_for(info.id):
            vm = _live(self._sandboxes.new_vm(spec, info, stored))
            if vm is None:
                ctx.fail(info.id, VmState.STOPPED, "the backend cannot receive a live VM")
                raise ConfigError([f"backend {spec.name} cannot receive a VM live"],
                                  what="live teleport")
            try:
                endpoints = await vm.receive_live_document(plan)
            except Exception as exc:
                ctx.db.set_error(info.id, f"live teleport failed: {exc}", ctx.clock())
                raise
        return ctx.info(info.id), endpoints

    async def finish_live_arrival(self, sandbox_id: str, timeout: float, *,
                                  main_log: Path | None = None,
                                  record: Mapping[str, Any] | None = None) -> SandboxInfo:
        """Run the sandbox whose VM came live, once the migration completed, with its main
        command's log so far (moved from ``main_log``) and how much output that log holds
        (from the source's ``record`` at the switch; the one it arrived with was taken
        before the migration)."""
        ctx = self._ctx
        vm = self._live_vm(sandbox_id)
        offset = None if record is None else sandbox_from_record(dict(record)).main_output_offset
        ctx.db.set_main_output_offset(sandbox_id, offset)
        if main_log is not None:
            ctx.storage.mkdir(ctx.sandbox_dir(sandbox_id))
            ctx.storage.rename(main_log, ctx.output_log(sandbox_id))
        async with ctx.lock_for(sandbox_id):
            await vm.finish_live(timeout)
            self._mains.follow(sandbox_id, ctx.vms[sandbox_id])
        return ctx.info(sandbox_id)

    async def abort_live_arrival(self, sandbox_id: str) -> None:
        """Give up a VM waiting for a live migration (no-op for any other)."""
        vm = self._ctx.vms.get(sandbox_id)
        live = _live(vm)
        if vm is not None and live is not None and vm.state is VmState.STARTING:
            await live.abort_live()

    async def give_back(self, sandbox_id: str, *, was_running: bool) -> SandboxInfo | None:
        """Undo a move that did not happen: resume the sandbox if it ran before, release
        the hold. None if the sandbox is gone (removed by an earlier recovery)."""
        ctx = self._ctx
        if ctx.db.get(sandbox_id) is None:
            self.unhold(sandbox_id)
            return None
        async with ctx.lock_for(sandbox_id):
            vm = ctx.vms.get(sandbox_id)
            if was_running and vm is not None and vm.state is VmState.PAUSED:
                await vm.resume()
                self._mains.follow(sandbox_id, vm)
            self._mains.release_output(sandbox_id)
        self.unhold(sandbox_id)
        return ctx.info(sandbox_id)

    async def let_go(self, sandbox_id: str) -> None:
        """Remove the copy of a sandbox another host now owns (its VM is killed)."""
        if self._ctx.db.get(sandbox_id) is not None:
            await self._sandboxes.remove(sandbox_id, force=True, moving=True)
        self.unhold(sandbox_id)

    # ---- arriving -----------------------------------------------------------------------
    async def arrive(self, record: dict[str, Any], snapshot_dir: Path, *,
                     main_log: Path | None) -> SandboxInfo:
        """Take in a sandbox from another host: its record under its own id and name, its
        main command's log (moved from ``main_log``, on the runtime's file system), its VM
        restored from the snapshot in ``snapshot_dir``.

        On failure the record stays (state stopped, with the error): the caller removes it.
        """
        ctx = self._ctx
        snapshot = VmSnapshot.open(snapshot_dir, storage=ctx.storage)
        info, spec, stored = await self._insert_arrival(record)
        if main_log is not None:
            ctx.storage.mkdir(ctx.sandbox_dir(info.id))
            ctx.storage.rename(main_log, ctx.output_log(info.id))
        async with ctx.lock_for(info.id):
            vm = self._sandboxes.new_vm(spec, info, stored)
            try:
                await vm.restore(snapshot, paused=False)
            except Exception as exc:
                ctx.db.set_error(info.id, f"teleport restore failed: {exc}", ctx.clock())
                if vm.state is VmState.CREATED:
                    ctx.fail(info.id, VmState.STOPPED, f"teleport restore failed: {exc}")
                raise
            if info.command is not None:
                if snapshot.manifest.kind is SnapshotKind.FULL and info.main_exec_id:
                    self._mains.follow(info.id, vm)
                elif snapshot.manifest.kind is not SnapshotKind.FULL:
                    self._mains.start(ctx.info(info.id), vm)
        return ctx.info(info.id)

    async def _insert_arrival(
        self, record: dict[str, Any],
    ) -> tuple[SandboxInfo, BackendSpec, StoredImage | None]:
        """Record an arriving sandbox (state created) with this host's root disk for its
        image; its backend and the image it uses."""
        ctx = self._ctx
        arriving = sandbox_from_record(record)
        spec = ctx.factory.registry.get(arriving.backend)
        self._sandboxes.check_free_name(arriving.name)
        stored = None
        config = arriving.config
        if arriving.image_digest is not None:
            stored = ctx.images.get(arriving.image_digest)
        elif arriving.image is not None:  # moved to another arch: its variant of the image
            stored = ctx.images.resolve(arriving.image, architecture=Platform.for_arch(
                config.arch or host_arch()).architecture)
            arriving = dataclasses.replace(arriving, image_digest=stored.digest)
        if stored is not None:
            root_disk = await asyncio.to_thread(rootfs_ext4, ctx.images, stored,
                                                size_mib=base_disk_mib(record))
            config = config.evolve(root_disk=root_disk)
        now = ctx.clock()
        info = dataclasses.replace(arriving, config=config, updated_at=now,
                                   created_at=arriving.created_at or now)
        try:
            ctx.db.insert(info)
        except IdInUse:
            raise ConfigError([f"a sandbox with id {info.id} already exists here"],
                              what="teleported sandbox") from None
        return info, spec, stored


def _offset(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"main_output_offset {value!r} is not a byte count")
    return value


def _live(vm: object) -> LiveMigratable | None:
    """The VM as one that can move live, if its backend can."""
    return vm if isinstance(vm, LiveMigratable) else None
