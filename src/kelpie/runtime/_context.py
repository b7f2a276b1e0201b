"""What every part of the runtime shares: the open database, the live VMs and their locks,
and the injected backends, image store, storage, clock and id source."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from kelpie.images import ImageStore
from kelpie.runtime._arguments import label
from kelpie.runtime._db import SnapshotDb, StateDb
from kelpie.runtime._errors import (
    AmbiguousSandbox,
    RuntimeNotOpen,
    SandboxMoving,
    SandboxNotFound,
    SandboxStateError,
)
from kelpie.runtime._info import ACTIVE_STATES, SandboxInfo
from kelpie.vm import ConfigError, Storage, StorageError, VmFactory, VmInstance, VmState

MIN_PREFIX_LENGTH = 3
ID_ATTEMPTS = 8
SANDBOXES_DIR = "sandboxes"
SNAPSHOTS_DIR = "snapshots"
OUTPUT_LOG = "output.log"

logger = logging.getLogger("kelpie.runtime")


class RuntimeContext:
    """The state one open runtime shares between its parts, and the lookups on it.

    ``db`` is the state database (set by :meth:`Runtime.open`); ``vms`` the live VM of
    each sandbox that has one. Every directory change goes through ``storage``, every
    timestamp comes from ``clock``, every wait (a restart's back-off) from ``sleep``.
    """

    def __init__(
        self, *, data_dir: Path, factory: VmFactory,
        backend_options: Mapping[str, Mapping[str, Any]], images: ImageStore | None,
        storage: Storage, clock: Callable[[], float], new_id: Callable[[], str],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.data_dir = data_dir
        self.factory = factory
        self.backend_options = {k: dict(v) for k, v in backend_options.items()}
        self._images = images
        self.storage = storage
        self.clock = clock
        self.sleep = sleep
        self.new_id = new_id
        self.open_db: StateDb | None = None
        self.vms: dict[str, VmInstance] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.held: dict[str, str] = {}
        """Sandboxes a move holds (id -> which move): see :mod:`kelpie.runtime._moves`."""
        self.on_crash: Callable[[str], None] = lambda sandbox_id: None
        """Told the id of each sandbox whose VM crashed (once recorded)."""

    def tidy(self, what: str, step: Callable[[], object]) -> None:
        """Run one clean-up step of recovery, best effort: a leftover that cannot be
        removed now (EACCES, EBUSY...) is logged and tried again at the next open, and
        never keeps the runtime from opening and re-attaching its sandboxes."""
        try:
            step()
        except StorageError as exc:
            logger.warning("could not %s (it is unrecorded; the next open tries again): %s",
                           what, exc)

    @property
    def db(self) -> StateDb:
        """The open state database; :class:`RuntimeNotOpen` before open or after close."""
        if self.open_db is None:
            raise RuntimeNotOpen()
        return self.open_db

    @property
    def snapshot_db(self) -> SnapshotDb:
        return SnapshotDb(self.db)

    @property
    def images(self) -> ImageStore:
        if self._images is None:
            self._images = ImageStore(self.data_dir / "images")
        return self._images

    # ---- where things live --------------------------------------------------------------
    @property
    def sandboxes_dir(self) -> Path:
        return self.data_dir / SANDBOXES_DIR

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / SNAPSHOTS_DIR

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """The runtime's own directory of a sandbox (its main command's output log)."""
        return self.sandboxes_dir / sandbox_id

    def output_log(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / OUTPUT_LOG

    # ---- finding ------------------------------------------------------------------------
    def info(self, sandbox_id: str) -> SandboxInfo:
        """The record of the sandbox with exactly this id."""
        info = self.db.get(sandbox_id)
        if info is None:
            raise SandboxNotFound(sandbox_id)
        return info

    def find(self, ref: str) -> SandboxInfo:
        """The sandbox named ``ref``, with id ``ref``, or whose id starts with ``ref``."""
        db = self.db
        found = db.find_by_name(ref) or db.get(ref)
        if found is not None:
            return found
        if len(ref) < MIN_PREFIX_LENGTH:
            raise SandboxNotFound(ref, f"; {ref!r} is too short to be an id prefix")
        matches = db.find_by_id_prefix(ref)
        if len(matches) > 1:
            raise AmbiguousSandbox(ref, [(m.id, m.name) for m in matches])
        if not matches:
            raise SandboxNotFound(ref)
        return matches[0]

    def list(self, *, all: bool = False) -> builtins.list[SandboxInfo]:
        return [i for i in self.db.all() if all or i.state in ACTIVE_STATES]

    def check_not_held(self, info: SandboxInfo, operation: str) -> None:
        """Refuse to change a sandbox a move holds (it may be running elsewhere soon)."""
        why = self.held.get(info.id)
        if why is not None:
            raise SandboxMoving(label(info), operation, why)

    def lock_for(self, sandbox_id: str) -> asyncio.Lock:
        return self.locks.setdefault(sandbox_id, asyncio.Lock())

    def live_vm(self, info: SandboxInfo, operation: str) -> VmInstance:
        """The live VM of a sandbox; a sandbox at rest has none."""
        vm = self.vms.get(info.id)
        if vm is None:
            raise SandboxStateError(
                label(info), operation, info.state, [VmState.RUNNING],
                f"; start it first (Runtime.start({info.name!r}))",
            )
        return vm

    def fresh_id(self) -> str:
        sandbox_id = self.new_id()
        if len(sandbox_id) < MIN_PREFIX_LENGTH or any(
            c not in "0123456789abcdef" for c in sandbox_id
        ):
            raise ConfigError([f"id source gave {sandbox_id!r}; sandbox ids are at least "
                               f"{MIN_PREFIX_LENGTH} lowercase hex digits"], what="sandbox id")
        return sandbox_id

    # ---- VMs and their states -----------------------------------------------------------
    def options(self, backend: str) -> dict[str, Any]:
        return dict(self.backend_options.get(backend, {}))

    def vm_for(self, info: SandboxInfo) -> VmInstance:
        """The sandbox's VM: its live one, else a new (not started) one from its backend."""
        vm = self.vms.get(info.id)
        if vm is None:
            spec = self.factory.registry.get(info.backend)
            vm = spec.create(info.config, vm_id=info.id, **self.options(spec.name))
            self.adopt(info.id, vm)
        return vm

    def adopt(self, sandbox_id: str, vm: VmInstance) -> None:
        """Track ``vm`` as the VM of ``sandbox_id`` and record its state changes."""
        self.vms[sandbox_id] = vm
        vm.observe(self._on_transition)

    def _on_transition(self, vm: VmInstance, old: VmState, new: VmState) -> None:
        if self.open_db is None or self.vms.get(vm.id) is not vm:
            return  # a VM this runtime no longer owns (closed, or removed)
        self.record_state(vm, new)
        if new is VmState.CRASHED:
            self.on_crash(vm.id)

    def record_state(self, vm: VmInstance, state: VmState) -> None:
        reason = vm.crash_reason if state is VmState.CRASHED else None
        self.db.set_state(vm.id, state, self.clock(), reason=reason)

    def fail(self, sandbox_id: str, state: VmState, error: str) -> None:
        now = self.clock()
        self.db.set_state(sandbox_id, state, now, reason=error)
        self.db.set_error(sandbox_id, error, now)
