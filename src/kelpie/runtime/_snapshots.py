"""Snapshots and templates the runtime keeps: take, list, restore, remove, export, import.

A snapshot directory is complete before it is recorded (the backend writes it under a
partial name and renames it into place), and its record is deleted before its directory
is: so a recorded snapshot is always whole, and whatever is on disk without a record is
a leftover that :meth:`Snapshots.recover` removes when the runtime opens.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any

from kelpie.api import SandboxCreate
from kelpie.runtime import _arguments as args
from kelpie.runtime._archive import read_archive, write_archive
from kelpie.runtime._context import ID_ATTEMPTS, MIN_PREFIX_LENGTH, RuntimeContext
from kelpie.runtime._db import _sandbox_from_json, _sandbox_json
from kelpie.runtime._errors import (
    AmbiguousSnapshot,
    SandboxStateError,
    SnapshotNameInUse,
    SnapshotNotFound,
)
from kelpie.runtime._info import SandboxInfo, SnapshotInfo
from kelpie.runtime._mains import MainCommands
from kelpie.runtime._names import check_name
from kelpie.runtime._sandboxes import AT_REST, Sandboxes
from kelpie.vm import (
    PARTIAL_SUFFIX,
    ConfigError,
    SnapshotCorrupted,
    SnapshotKind,
    SnapshotManifest,
    Storage,
    UnknownBackend,
    VmSnapshot,
    VmState,
)

TRASH_PREFIX = ".trash-"


def snapshot_holder(snapshot_id: str) -> str:
    return f"snapshot:{snapshot_id}"


class Snapshots:
    """The runtime's snapshots: one directory per snapshot id plus its database record."""

    def __init__(self, ctx: RuntimeContext, sandboxes: Sandboxes, mains: MainCommands) -> None:
        self._ctx = ctx
        self._sandboxes = sandboxes
        self._mains = mains
        self._verified: set[str] = set()
        """Snapshots verified whole in this process (taken or restored here): further
        restores of them skip hashing (a template's clones)."""

    @property
    def dir(self) -> Path:
        return self._ctx.snapshots_dir

    # ---- recovery -----------------------------------------------------------------------
    def recover(self) -> None:
        """Settle what a crash left: a removal cut short before its record was deleted is
        undone (the snapshot is still recorded); partial, trashed and unrecorded
        directories are removed (they were never, or are no longer, valid snapshots)."""
        ctx = self._ctx
        if not ctx.storage.is_dir(self.dir):
            return
        known = {s.id for s in ctx.snapshot_db.all()}
        entries = ctx.storage.list_dir(self.dir)
        for entry in entries:
            if entry in known:
                continue
            trashed = entry.removeprefix(TRASH_PREFIX)
            path = self.dir / entry
            if entry.startswith(TRASH_PREFIX) and trashed in known and trashed not in entries:
                ctx.tidy(f"put back snapshot {trashed} from {path}",
                         partial(ctx.storage.rename, path, self.dir / trashed))
            else:
                ctx.tidy(f"remove the leftover {path}", partial(ctx.storage.remove_tree, path))

    # ---- finding ------------------------------------------------------------------------
    def with_path(self, info: SnapshotInfo) -> SnapshotInfo:
        return dataclasses.replace(info, path=self.dir / info.id)

    def list(self, *, templates: bool | None) -> builtins.list[SnapshotInfo]:
        return [self.with_path(s) for s in self._ctx.snapshot_db.all()
                if templates is None or s.template == templates]

    def get(self, ref: str, *, template: bool | None = None) -> SnapshotInfo:
        what = "template" if template else "snapshot"
        db = self._ctx.snapshot_db
        found = db.find_by_name(ref) or db.get(ref)
        if found is None and len(ref) >= MIN_PREFIX_LENGTH:
            matches = db.find_by_id_prefix(ref)
            if len(matches) > 1:
                raise AmbiguousSnapshot(ref, [(m.id, m.name) for m in matches])
            found = matches[0] if matches else None
        if found is None or (template is not None and found.template != template):
            raise SnapshotNotFound(ref, what)
        return self.with_path(found)

    def check_free_name(self, name: str) -> None:
        check_name(name)
        if self._ctx.snapshot_db.find_by_name(name) is not None:
            raise SnapshotNameInUse(name)

    def open(self, info: SnapshotInfo) -> VmSnapshot:
        """The snapshot's directory, its manifest checked (its blobs when restored)."""
        assert info.path is not None
        return VmSnapshot.open(info.path, storage=self._ctx.storage)

    def incompatibilities(self, ref: str) -> tuple[SnapshotInfo, SnapshotManifest,
                                                    builtins.list[str]]:
        """Snapshot ``ref``, its manifest, and every reason it would not restore here."""
        ctx = self._ctx
        snap = self.get(ref)
        manifest = self.open(snap).manifest
        try:
            probe = ctx.factory.registry.probe(snap.backend)
        except UnknownBackend:
            return snap, manifest, [f"backend: {snap.backend} is not known to this Kelpie"]
        if not probe.available:
            return snap, manifest, [f"backend: {snap.backend} is not available on this host "
                                    f"({probe.reason})"]
        spec = ctx.factory.registry.get(snap.backend)
        vm = spec.create(snap.sandbox.config, vm_id=snap.id, **ctx.options(spec.name))
        return snap, manifest, manifest.incompatibilities(vm.host_info())

    # ---- taking and removing ------------------------------------------------------------
    async def take(
        self, ref: str, *, name: str | None, kind: SnapshotKind | str, leave_paused: bool,
        template: bool, workspace: str | None,
    ) -> SnapshotInfo:
        ctx = self._ctx
        snapshot_kind = args.snapshot_kind(kind)
        info = ctx.find(ref)
        snapshot_id = self._fresh_id()
        name = name or f"{info.name}-{snapshot_id[:6]}"
        self.check_free_name(name)
        dest = self.dir / snapshot_id
        ctx.storage.mkdir(self.dir)
        ctx.check_not_held(info, "snapshot")
        async with ctx.lock_for(info.id):
            info = ctx.info(info.id)
            if info.id not in ctx.vms and snapshot_kind is not SnapshotKind.DISK:
                raise SandboxStateError(args.label(info), "take a full snapshot of",
                                        info.state, [VmState.RUNNING, VmState.PAUSED])
            vm = ctx.vm_for(info)
            if snapshot_kind is SnapshotKind.CHECKPOINT:
                vm.checkpoint_workspace = workspace or args.workspace_of(info)
            try:
                # a template's memory is shared copy-on-write by its clones (where the
                # backend can): it is verified here, once, not by every clone
                taken = await vm.snapshot(dest, kind=snapshot_kind, leave_paused=leave_paused,
                                          shareable=template)
            except BaseException:
                # e.g. the VM died while resuming after the snapshot was written: the
                # directory may be whole, but unrecorded it must not stay
                _remove_quietly(ctx.storage, dest, only_if_there=True)
                raise
        self._verified.add(snapshot_id)  # every blob was hashed as it was written
        record = SnapshotInfo(
            id=snapshot_id, name=name, kind=snapshot_kind, backend=info.backend,
            sandbox=info, template=template, sandbox_id=info.id, sandbox_name=info.name,
            image=info.image, image_digest=info.image_digest,
            size=sum(b.size for b in taken.manifest.blobs.values()), created_at=ctx.clock(),
        )
        self._record(record)
        return self.with_path(record)

    def _record(self, record: SnapshotInfo) -> None:
        """Hold the snapshot's image and record it; on failure remove its directory."""
        ctx = self._ctx
        try:
            if record.image_digest is not None:
                ctx.images.retain(record.image_digest, snapshot_holder(record.id))
            ctx.snapshot_db.insert(record)
        except BaseException:
            if record.image_digest is not None:
                ctx.images.release(record.image_digest, snapshot_holder(record.id))
            _remove_quietly(ctx.storage, self.dir / record.id)
            raise

    def _fresh_id(self) -> str:
        ctx = self._ctx
        for _ in range(ID_ATTEMPTS):
            candidate = ctx.fresh_id()
            if ctx.snapshot_db.get(candidate) is None and not ctx.storage.exists(
                self.dir / candidate
            ):
                return candidate
        raise ConfigError([f"could not find a free snapshot id in {ID_ATTEMPTS} attempts"],
                          what="snapshot id")

    def remove(self, ref: str, *, template: bool | None) -> SnapshotInfo:
        """Directory to the trash (atomically), then the record, then the trash."""
        ctx = self._ctx
        info = self.get(ref, template=template)
        path = self.dir / info.id
        trash = self.dir / f"{TRASH_PREFIX}{info.id}"
        if ctx.storage.exists(path):
            ctx.storage.rename(path, trash)
        ctx.snapshot_db.delete(info.id)
        if info.image_digest is not None:
            ctx.images.release(info.image_digest, snapshot_holder(info.id))
        _remove_quietly(ctx.storage, trash)
        return info

    # ---- restoring ----------------------------------------------------------------------
    async def create_from_template(self, req: SandboxCreate) -> SandboxInfo:
        """A new sandbox restored from template ``req.template``; only its name, env and
        labels may be given, the template fixes everything else."""
        assert req.template is not None
        fixed = {"image": req.image, "cpus": req.cpus, "memory_mib": req.memory_mib,
                 "workdir": req.workdir, "user": req.user,
                 "entrypoint": req.entrypoint, "start": None if req.start else False,
                 "volumes": req.volumes or None, "ports": req.ports or None,
                 "backend": req.backend, "hostname": req.hostname, "command": req.command,
                 "network": None if req.network == "none" else req.network,
                 "allow": req.allow or None, "deny": req.deny or None,
                 "restart": req.restart, "stop_timeout": req.stop_timeout}
        given = sorted(k for k, v in fixed.items() if v is not None)
        if given:
            raise ConfigError([f"{', '.join(given)} cannot be given with a template: the "
                               "template fixes them (only name, env, labels and a bigger "
                               "disk_mib may be)"], what="sandbox")
        if req.disk_mib is not None:
            self._sandboxes.check_disk_growth(self.get(req.template, template=True).sandbox,
                                              req.disk_mib, "sandbox")
        return await self.restore(req.template, name=req.name, paused=False, template=True,
                                  labels=req.labels, env=req.env, disk_mib=req.disk_mib)

    async def restore(
        self, ref: str, *, name: str | None, paused: bool, template: bool | None,
        labels: Mapping[str, str] | None, env: Mapping[str, str] | None,
        disk_mib: int | None = None,
    ) -> SandboxInfo:
        """A new sandbox from snapshot ``ref``; ``disk_mib``: its disk grown to that (the
        caller checked it), once it runs."""
        ctx = self._ctx
        snap = self.get(ref, template=template)
        source = self.open(snap)
        spec = ctx.factory.registry.get(snap.backend)
        if name is not None:
            self._sandboxes.check_free_name(name)
        stored = None
        if snap.image_digest is not None:
            stored = ctx.images.get(snap.image_digest)  # ImageNotFound names the digest
        base = snap.sandbox
        config = base.config.evolve(env={**base.config.env, **(env or {})}) if env else \
            base.config
        boots = snap.kind is SnapshotKind.DISK  # a fresh boot runs the main command again
        info = self._sandboxes.insert(
            spec, name, config, stored, {**base.labels, **(labels or {})},
            base.command if boots else None, args.CommandDefaults.of_sandbox(base),
            restart=base.restart if boots else None, stop_timeout=base.stop_timeout)
        async with ctx.lock_for(info.id):
            vm = self._sandboxes.new_vm(spec, info, stored)
            try:
                await vm.restore(source, paused=paused, verify=snap.id not in self._verified)
                self._verified.add(snap.id)
            except Exception as exc:
                ctx.db.set_error(info.id, f"restore failed: {exc}", ctx.clock())
                if vm.state is VmState.CREATED:
                    ctx.fail(info.id, VmState.STOPPED, f"restore failed: {exc}")
                raise
            await self._sandboxes.grow_disk(info.id, vm, disk_mib)
        return ctx.info(info.id)

    async def restore_into(self, sandbox: str, snapshot: str, *, paused: bool) -> SandboxInfo:
        ctx = self._ctx
        info = ctx.find(sandbox)
        ctx.check_not_held(info, "restore into")
        snap = self.get(snapshot)
        if snap.sandbox_id != info.id:
            raise ConfigError([f"snapshot {snap.name} was taken from sandbox "
                               f"{snap.sandbox_name} ({snap.sandbox_id}), not from "
                               f"{args.label(info)}; restore it into a new sandbox instead"],
                              what="restore")
        source = self.open(snap)
        async with ctx.lock_for(info.id):
            info = ctx.info(info.id)
            if info.state not in AT_REST:
                raise SandboxStateError(args.label(info), "restore into", info.state, AT_REST,
                                        "; stop it first")
            self._mains.stop(info.id)
            vm = ctx.vms.get(info.id)
            if vm is not None and vm.state is VmState.CRASHED:
                await vm.stop(force=True)
            vm = ctx.vm_for(info)
            try:
                await vm.restore(source, paused=paused)
            except Exception as exc:
                ctx.db.set_error(info.id, f"restore failed: {exc}", ctx.clock())
                raise
            if snap.kind is SnapshotKind.DISK and info.command is not None:
                self._mains.start(ctx.info(info.id), vm)
        return ctx.info(info.id)

    # ---- archives -----------------------------------------------------------------------
    async def export(self, ref: str, out: IO[bytes], *, compress: bool) -> None:
        info = self.get(ref)
        meta = {"name": info.name, "kind": info.kind.value, "template": info.template,
                "backend": info.backend, "image": info.image, "image_digest": info.image_digest,
                "sandbox_id": info.sandbox_id, "sandbox_name": info.sandbox_name,
                "created_at": info.created_at, "sandbox": _sandbox_json(info.sandbox)}
        assert info.path is not None
        await asyncio.to_thread(write_archive, out, info.path, meta, compress=compress,
                                storage=self._ctx.storage)

    async def import_(self, source: IO[bytes], *, name: str | None) -> SnapshotInfo:
        ctx = self._ctx
        snapshot_id = self._fresh_id()
        ctx.storage.mkdir(self.dir)
        partial = self.dir / f".import-{snapshot_id}{PARTIAL_SUFFIX}"
        try:
            meta, manifest = await asyncio.to_thread(_unpack_verified, source, partial,
                                                     ctx.storage)
            record = self._imported(snapshot_id, name, meta, manifest)
            self.check_free_name(record.name)
            ctx.storage.rename(partial, self.dir / snapshot_id)
        except BaseException:
            _remove_quietly(ctx.storage, partial)
            raise
        self._record(record)
        return self.with_path(record)

    def _imported(self, snapshot_id: str, name: str | None, meta: dict[str, Any],
                  manifest: SnapshotManifest) -> SnapshotInfo:
        try:
            sandbox: SandboxInfo = _sandbox_from_json(
                meta["sandbox"], str(meta["backend"]), meta.get("image"),
                meta.get("image_digest"))
            return SnapshotInfo(
                id=snapshot_id, name=name or str(meta["name"]), kind=SnapshotKind(meta["kind"]),
                backend=str(meta["backend"]), sandbox=sandbox,
                template=bool(meta.get("template")), sandbox_id=meta.get("sandbox_id"),
                sandbox_name=meta.get("sandbox_name"), image=meta.get("image"),
                image_digest=meta.get("image_digest"),
                size=sum(b.size for b in manifest.blobs.values()),
                created_at=float(meta.get("created_at") or self._ctx.clock()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotCorrupted(f"snapshot archive metadata is invalid: {exc}") from None


def _unpack_verified(source: IO[bytes], dest: Path, storage: Storage,
                     ) -> tuple[dict[str, Any], SnapshotManifest]:
    """Unpack an archive and verify every blob against its manifest (a worker thread)."""
    meta, manifest = read_archive(source, dest, storage=storage)
    VmSnapshot(dest, manifest, storage).verify()
    return meta, manifest


def _remove_quietly(storage: Storage, path: Path, *, only_if_there: bool = False) -> None:
    """Best-effort removal of what an operation leaves on failure: the next open removes
    whatever this cannot (it is unrecorded)."""
    with contextlib.suppress(Exception):  # never mask the error being raised
        if not only_if_there or storage.exists(path):
            storage.remove_tree(path)
