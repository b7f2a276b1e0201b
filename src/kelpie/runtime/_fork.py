"""Fork: one running sandbox into many, each child a copy of the moment of the fork.

The parent pauses once, for a ``shareable`` full snapshot (its RAM as a file next to the
device state, its disk overlay): that capture is frozen, since the parent then runs on as
before and nothing it writes reaches the copy. Every child restores the capture: its own
id, name, host name and RNG reseed, its own disk (a copy of the frozen overlay over the
image), and, where the backend can (QEMU), the capture's RAM mapped copy-on-write, so N
idle children cost the pages they write. The capture is verified once, when it is taken;
the children do not hash it again. It is removed once every child runs (their mappings
keep what they share alive).

Published ports are not inherited (two children cannot bind one host port); a sandbox with
host volumes is refused (their state cannot be captured). If a child fails to start, the
children made so far are removed and the error raised: a fork makes all or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from pathlib import Path

from kelpie.images import StoredImage
from kelpie.runtime import _arguments as args
from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._errors import SandboxStateError
from kelpie.runtime._info import SandboxInfo
from kelpie.runtime._names import check_name
from kelpie.runtime._sandboxes import Sandboxes
from kelpie.vm import BackendSpec, ConfigError, SnapshotKind, VmSnapshot, VmState

MAX_CHILDREN = 100
FORKS_DIR = "forks"


class Forks:
    """Forks sandboxes of one runtime (see the module docstring)."""

    def __init__(self, ctx: RuntimeContext, sandboxes: Sandboxes) -> None:
        self._ctx = ctx
        self._sandboxes = sandboxes

    async def fork(self, ref: str, count: int, *, name_prefix: str | None = None,
                   names: Sequence[str] | None = None,
                   disk_mib: int | None = None) -> list[SandboxInfo]:
        """``count`` children of sandbox ``ref`` (running or paused), named ``names`` or
        ``PREFIX-1`` ... (``PREFIX`` defaults to the parent's name); they run, with a root
        disk of ``disk_mib`` (default: the parent's size; never smaller)."""
        ctx = self._ctx
        parent = ctx.find(ref)
        child_names = self._names(parent, count, name_prefix, names)
        self._sandboxes.check_disk_growth(parent, disk_mib, "fork")
        if parent.config.mounts:
            volumes = ", ".join(f"{m.host_path}:{m.guest_path}" for m in parent.config.mounts)
            raise ConfigError([f"sandbox {args.label(parent)} has host volumes ({volumes}), "
                               "whose state a fork cannot capture (QEMU's 9p blocks it); "
                               "fork a sandbox without volumes"], what="fork")
        ctx.check_not_held(parent, "fork")
        capture_dir = ctx.data_dir / FORKS_DIR / f"{parent.id}-{secrets.token_hex(4)}"
        ctx.storage.mkdir(capture_dir.parent)
        try:
            capture = await self._capture(parent, capture_dir)
            return await self._children(parent, capture, child_names, disk_mib)
        finally:
            with contextlib.suppress(Exception):
                ctx.storage.remove_tree(capture_dir)

    def _names(self, parent: SandboxInfo, count: int, prefix: str | None,
               names: Sequence[str] | None) -> list[str]:
        if not 1 <= count <= MAX_CHILDREN:
            raise ConfigError([f"count is {count}; a fork makes 1 to {MAX_CHILDREN} children"],
                              what="fork")
        if names is not None and len(names) != count:
            raise ConfigError([f"{len(names)} names given for {count} children"], what="fork")
        chosen = list(names) if names is not None else \
            [f"{prefix or parent.name}-{i}" for i in range(1, count + 1)]
        if len(set(chosen)) != len(chosen):
            raise ConfigError([f"the children's names repeat: {', '.join(chosen)}"],
                              what="fork")
        for name in chosen:
            check_name(name)
            self._sandboxes.check_free_name(name)
        return chosen

    async def _capture(self, parent: SandboxInfo, capture_dir: Path) -> VmSnapshot:
        """The frozen state: a shareable full snapshot; the parent goes on as it was."""
        ctx = self._ctx
        async with ctx.lock_for(parent.id):
            info = ctx.info(parent.id)
            vm = ctx.vms.get(info.id)
            if vm is None or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                raise SandboxStateError(args.label(info), "fork", info.state,
                                        [VmState.RUNNING, VmState.PAUSED])
            return await vm.snapshot(capture_dir / "capture", kind=SnapshotKind.FULL,
                                     leave_paused=vm.state is VmState.PAUSED, shareable=True)

    async def _children(self, parent: SandboxInfo, capture: VmSnapshot,
                        names: list[str], disk_mib: int | None) -> list[SandboxInfo]:
        ctx = self._ctx
        spec = ctx.factory.registry.get(parent.backend)
        stored = None if parent.image_digest is None else ctx.images.get(parent.image_digest)
        config = parent.config.evolve(ports=(), hostname=None)
        made: list[SandboxInfo] = []
        for name in names:
            made.append(self._sandboxes.insert(spec, name, config, stored,
                                               {**parent.labels, "kelpie.fork-of": parent.id},
                                               None, args.CommandDefaults.of_sandbox(parent),
                                               stop_timeout=parent.stop_timeout))
        try:
            await asyncio.gather(*(self._start(spec, info, stored, capture, disk_mib)
                                   for info in made))
        except BaseException:
            for info in made:
                with contextlib.suppress(Exception):
                    await self._sandboxes.remove(info.id, force=True)
            raise
        return [ctx.info(info.id) for info in made]

    async def _start(self, spec: BackendSpec, info: SandboxInfo, stored: StoredImage | None,
                     capture: VmSnapshot, disk_mib: int | None) -> None:
        ctx = self._ctx
        async with ctx.lock_for(info.id):
            vm = self._sandboxes.new_vm(spec, info, stored)
            try:
                await vm.restore(capture, verify=False)  # verified when it was taken
            except Exception as exc:
                ctx.db.set_error(info.id, f"fork failed: {exc}", ctx.clock())
                if vm.state is VmState.CREATED:
                    ctx.fail(info.id, VmState.STOPPED, f"fork failed: {exc}")
                raise
            await self._sandboxes.grow_disk(info.id, vm, disk_mib)
