"""Sandbox lifecycle: create, start, stop, pause, resume, remove, and re-attach after a restart.

The record is written before anything starts and deleted only by :meth:`Sandboxes.remove`,
after everything else is gone, so a failure (or a crash) at any step leaves a record saying
what happened, never a VM or directory nobody knows about.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from kelpie.api import SandboxCreate
from kelpie.guestkit import host_arch
from kelpie.images import Platform, StoredImage, rootfs_ext4
from kelpie.runtime import _arguments as args
from kelpie.runtime._context import ID_ATTEMPTS, RuntimeContext
from kelpie.runtime._db import IdInUse
from kelpie.runtime._errors import SandboxNameInUse, SandboxStateError
from kelpie.runtime._info import SandboxInfo
from kelpie.runtime._mains import MainCommands
from kelpie.runtime._names import check_name, generated_name
from kelpie.runtime._restart import RestartMode, RestartPolicy
from kelpie.vm import (
    DEFAULT_DISK_MIB,
    DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
    BackendSpec,
    ConfigError,
    EgressPolicy,
    KelpieError,
    UnsupportedOperation,
    VmConfig,
    VmInstance,
    VmState,
)

AT_REST = (VmState.STOPPED, VmState.CRASHED)
STARTABLE = (VmState.CREATED, VmState.STOPPED, VmState.CRASHED)


def image_holder(sandbox_id: str) -> str:
    return f"sandbox:{sandbox_id}"


class Sandboxes:
    """Creates, starts, stops and removes sandboxes; recovers them when the runtime opens."""

    def __init__(self, ctx: RuntimeContext, mains: MainCommands) -> None:
        self._ctx = ctx
        self._mains = mains

    # ---- recovery -----------------------------------------------------------------------
    async def recover(self) -> None:
        """Remove what a crash left behind; re-attach to every sandbox not at rest, and
        mark the ones that cannot be re-attached crashed."""
        ctx = self._ctx
        records = ctx.db.all()
        known = {info.id for info in records}
        for entry in ctx.storage.list_dir(ctx.sandboxes_dir):
            if entry not in known:  # its record is gone: a remove was cut short
                path = ctx.sandbox_dir(entry)
                ctx.tidy(f"remove the leftover {path}", partial(ctx.storage.remove_tree, path))
        for info in records:
            if info.state in AT_REST or info.state is VmState.CREATED:
                continue  # CREATED: never started (created to start later, or cut short)
            reason = await self._reattach(info)
            if reason is not None:
                ctx.db.set_state(info.id, VmState.CRASHED, ctx.clock(), reason=reason)

    async def _reattach(self, info: SandboxInfo) -> str | None:
        """Reconnect to the VM of ``info``; return why not, or None when attached."""
        ctx = self._ctx
        try:
            spec = ctx.factory.registry.get(info.backend)
        except KelpieError as exc:
            return f"backend {info.backend!r} is not available after a restart: {exc}"
        if spec.attach is None:
            return f"backend {info.backend!r} VMs do not survive a restart"
        try:
            vm = await spec.attach(info.id)
        except Exception as exc:
            return f"could not re-attach to the VM after a restart: {exc}"
        ctx.adopt(info.id, vm)
        ctx.record_state(vm, vm.state)
        self._mains.follow(info.id, vm)
        return None

    # ---- create -------------------------------------------------------------------------
    async def create(self, req: SandboxCreate, progress: args.Progress | None) -> SandboxInfo:
        """Create a sandbox (not from a template) and start it; see :meth:`Runtime.create`."""
        ctx = self._ctx
        _ = ctx.db  # RuntimeNotOpen before anything else
        spec = ctx.factory.select(req.backend)
        if req.name is not None:
            self.check_free_name(req.name)
        arch = req.arch or host_arch()
        stored = None if req.image is None else \
            ctx.images.resolve(req.image, architecture=Platform.for_arch(arch).architecture)
        defaults = args.CommandDefaults.of(stored, workdir=req.workdir, user=req.user,
                                           entrypoint=req.entrypoint)
        main = defaults.main_command(req.command)
        config_mounts = tuple(args.mount(v) for v in req.volumes)
        config_ports = tuple(args.port(p) for p in req.ports)
        if stored is None and req.disk_mib is not None:
            raise ConfigError(["disk_mib: a sandbox without an image has no root disk to "
                               "size; give an image"], what="sandbox")
        disk_mib = None if stored is None else \
            DEFAULT_DISK_MIB if req.disk_mib is None else req.disk_mib
        # Checked whole before the root disk is built (which can take a while).
        config = VmConfig(
            vcpus=DEFAULT_VCPUS if req.cpus is None else req.cpus,
            memory_mib=DEFAULT_MEMORY_MIB if req.memory_mib is None else req.memory_mib,
            disk_mib=disk_mib,
            image=None if stored is None else args.image_label(stored),
            mounts=config_mounts,
            ports=config_ports,
            env={**(stored.config.environment() if stored else {}), **(req.env or {})},
            network=args.network(req.network),
            egress=EgressPolicy.parse(req.allow, req.deny),
            hostname=req.hostname,
            arch=arch,
        )
        if stored is not None:
            config = config.evolve(root_disk=await asyncio.to_thread(
                rootfs_ext4, ctx.images, stored, size_mib=disk_mib,
                progress=args.build_reporter(progress),
            ))
        restart = args.restart_policy(req.restart)
        stop_timeout = args.stop_timeout(req.stop_timeout)
        if restart.mode is not RestartMode.NO and main is None:
            raise ConfigError([f"restart policy {str(restart)!r} needs a main command to "
                               "restart; give a command (or [] for the image's)"],
                              what="sandbox")
        info = self.insert(spec, req.name, config, stored, req.labels or {}, main, defaults,
                           restart=restart, stop_timeout=stop_timeout)
        if progress is not None and req.start:
            progress(f"booting sandbox {info.name} ({info.short_id}) with {spec.name}")
        async with ctx.lock_for(info.id):
            vm = self.new_vm(spec, info, stored)
            if req.start:
                await self.start_vm(info.id, vm)
        return ctx.info(info.id)

    def check_free_name(self, name: str) -> None:
        check_name(name)
        owner = self._ctx.db.find_by_name(name)
        if owner is not None:
            raise SandboxNameInUse(name, owner.id)

    def insert(
        self, spec: BackendSpec, name: str | None, config: VmConfig,
        stored: StoredImage | None, labels: Mapping[str, str],
        command: tuple[str, ...] | None, defaults: args.CommandDefaults, *,
        restart: RestartPolicy | None = None, stop_timeout: float | None = None,
    ) -> SandboxInfo:
        """Write the new record (state ``created``), retrying an id that is taken."""
        ctx = self._ctx
        now = ctx.clock()
        for _ in range(ID_ATTEMPTS):
            sandbox_id = ctx.fresh_id()
            info = SandboxInfo(
                id=sandbox_id,
                name=name if name is not None else generated_name(sandbox_id),
                backend=spec.name,
                state=VmState.CREATED,
                config=config,
                image=config.image,
                image_digest=None if stored is None else stored.digest,
                workdir=defaults.workdir,
                user=defaults.user,
                labels=dict(labels),
                created_at=now,
                updated_at=now,
                command=command,
                image_command=defaults.image_command,
                image_entrypoint=defaults.entrypoint,
                restart=restart or RestartPolicy(),
                stop_timeout=stop_timeout,
            )
            try:
                ctx.db.insert(info)
            except IdInUse:
                continue
            except SandboxNameInUse:
                if name is None:
                    continue  # a generated name collided: another id gives another name
                raise
            return info
        raise ConfigError([f"could not find a free sandbox id in {ID_ATTEMPTS} attempts; "
                           "check the runtime's id source"], what="sandbox id")

    def new_vm(
        self, spec: BackendSpec, info: SandboxInfo, stored: StoredImage | None,
    ) -> VmInstance:
        """Make the sandbox's directory, hold the image and build the (not yet started) VM
        of a new record; a failure is kept in the record (state ``stopped``)."""
        ctx = self._ctx
        try:
            ctx.storage.mkdir(ctx.sandbox_dir(info.id))
            if stored is not None:
                ctx.images.retain(stored.digest, image_holder(info.id))
            vm = spec.create(info.config, vm_id=info.id, **ctx.options(spec.name))
        except Exception as exc:
            ctx.fail(info.id, VmState.STOPPED, f"create failed: {exc}")
            raise
        ctx.adopt(info.id, vm)
        workdir = getattr(vm, "workdir", None)
        if isinstance(workdir, Path):
            ctx.db.set_vm_dir(info.id, workdir)
        return vm

    async def start_vm(self, sandbox_id: str, vm: VmInstance, *,
                       restart: str | None = None) -> None:
        """Boot the sandbox's VM and start its main command (``restart``: why the restart
        policy boots it)."""
        ctx = self._ctx
        try:
            await vm.start()
        except Exception as exc:  # the VM's observer has recorded stopped/crashed already
            ctx.db.set_error(sandbox_id, f"start failed: {exc}", ctx.clock())
            raise
        info = ctx.info(sandbox_id)
        if info.command is not None:
            self._mains.start(info, vm, restart=restart)

    # ---- its disk -----------------------------------------------------------------------
    def check_disk_growth(self, info: SandboxInfo, disk_mib: int | None, what: str) -> None:
        """Refuse, before anything starts, a ``disk_mib`` that ``info``'s disk cannot grow
        to (a copy of ``info`` is made: a fork or a template's sandbox)."""
        if disk_mib is None:
            return
        spec = self._ctx.factory.registry.get(info.backend)
        if disk_mib != info.config.disk_mib and not spec.capabilities.grow_disk:
            raise UnsupportedOperation(spec.name, "grow a root disk",
                                       self._ctx.factory.registry.with_capability("grow_disk"))
        current = info.config.disk_mib
        if current is None:
            raise ConfigError([f"disk_mib: {args.label(info)} has no root disk to grow (no "
                               "image); leave disk_mib out"], what=what)
        if disk_mib < current:
            raise ConfigError([f"disk_mib is {disk_mib}, smaller than the {current} MiB "
                               f"disk of {args.label(info)}; a copy's disk can grow, not "
                               "shrink"], what=what)
        info.config.evolve(disk_mib=disk_mib)  # the range (ConfigError names it)

    async def grow_disk(self, sandbox_id: str, vm: VmInstance, disk_mib: int | None) -> None:
        """Grow the running sandbox's root disk (and file system) to ``disk_mib``, and its
        record with it (the caller holds its lock, and has checked the size)."""
        ctx = self._ctx
        info = ctx.info(sandbox_id)
        if disk_mib is None or disk_mib == info.config.disk_mib:
            return
        try:
            await vm.grow_disk(disk_mib)
        except Exception as exc:  # a copy without the disk asked for must not run on
            ctx.db.set_error(sandbox_id, f"growing its disk to {disk_mib} MiB failed: {exc}",
                             ctx.clock())
            await vm.stop(force=True)
            raise
        ctx.db.set_config(dataclasses.replace(info, config=info.config.evolve(disk_mib=disk_mib)),
                          ctx.clock())

    # ---- lifecycle ----------------------------------------------------------------------
    async def pause(self, ref: str) -> SandboxInfo:
        ctx = self._ctx
        info = ctx.find(ref)
        ctx.check_not_held(info, "pause")
        async with ctx.lock_for(info.id):
            await ctx.live_vm(info, "pause").pause()
        return ctx.info(info.id)

    async def resume(self, ref: str) -> SandboxInfo:
        ctx = self._ctx
        info = ctx.find(ref)
        ctx.check_not_held(info, "resume")
        async with ctx.lock_for(info.id):
            vm = ctx.live_vm(info, "resume")
            await vm.resume()
            self._mains.follow(info.id, vm)
        return ctx.info(info.id)

    async def stop(self, ref: str, *, timeout: float | None) -> SandboxInfo:
        ctx = self._ctx
        info = ctx.find(ref)
        ctx.check_not_held(info, "stop")
        async with ctx.lock_for(info.id):
            self._mains.stop(info.id)
            vm = ctx.vms.get(info.id)
            if vm is not None:
                if timeout is None:
                    timeout = info.stop_timeout
                await vm.stop(grace=None if timeout is None else max(timeout, 0.0))
            elif info.state not in AT_REST:  # pragma: no cover - recovery settles these
                ctx.db.set_state(info.id, VmState.STOPPED, ctx.clock())
        return ctx.info(info.id)

    async def start(self, ref: str) -> SandboxInfo:
        ctx = self._ctx
        info = ctx.find(ref)
        ctx.check_not_held(info, "start")
        async with ctx.lock_for(info.id):
            info = ctx.info(info.id)
            if info.state not in STARTABLE:
                raise SandboxStateError(args.label(info), "start", info.state, STARTABLE)
            vm = ctx.vms.get(info.id)
            if vm is not None and vm.state is VmState.CRASHED:
                await vm.stop(force=True)  # release what the dead VM held; CRASHED -> STOPPED
            vm = ctx.vm_for(info)
            await self.start_vm(info.id, vm)
        return ctx.info(info.id)

    async def restart_crashed(self, sandbox_id: str, why: str) -> bool:
        """Boot a sandbox whose VM crashed again (its restart policy's doing); False when
        it is no longer crashed (started, removed or moved meanwhile)."""
        ctx = self._ctx
        async with ctx.lock_for(sandbox_id):
            info = ctx.db.get(sandbox_id)
            if info is None or info.state is not VmState.CRASHED or sandbox_id in ctx.held:
                return False
            vm = ctx.vms.get(sandbox_id)
            if vm is not None and vm.state is VmState.CRASHED:
                await vm.stop(force=True)  # release what the dead VM held; -> STOPPED
            await self.start_vm(sandbox_id, ctx.vm_for(info), restart=why)
        return True

    async def remove(self, ref: str, *, force: bool, moving: bool = False) -> None:
        """Delete a sandbox: VM, directories, image hold, then the record (see Runtime);
        ``moving``: the move holding it removes it."""
        ctx = self._ctx
        info = ctx.find(ref)
        if not moving:
            ctx.check_not_held(info, "remove")
        async with ctx.lock_for(info.id):
            info = ctx.info(info.id)
            vm = ctx.vms.get(info.id)
            # A VM that crashed is at rest like a stopped one: no force needed.
            live = vm is not None and vm.state not in (*AT_REST, VmState.CREATED)
            if live and not force:
                raise SandboxStateError(
                    args.label(info), "remove", info.state, AT_REST,
                    "; stop it first, or remove it with force",
                )
            self._mains.stop(info.id)
            if vm is not None and vm.state is not VmState.STOPPED:
                await vm.stop(force=True)
            ctx.vms.pop(info.id, None)
            self._delete_leftovers(info)
            ctx.db.delete(info.id, ctx.clock())
        ctx.locks.pop(info.id, None)

    def _delete_leftovers(self, info: SandboxInfo) -> None:
        """Release the image and delete the directories of a stopped sandbox."""
        ctx = self._ctx
        if info.image_digest is not None:
            ctx.images.release(info.image_digest, image_holder(info.id))
        if info.vm_dir is not None:
            ctx.storage.remove_tree(info.vm_dir)
        ctx.storage.remove_tree(ctx.sandbox_dir(info.id))
