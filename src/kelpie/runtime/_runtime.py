"""Runtime: the one owner of sandboxes, used in-process by the SDK and by the daemon alike.

A sandbox is a VM plus its record in the state database (:mod:`kelpie.runtime._db`). The
record is written before anything starts and is removed only by :meth:`Runtime.remove`, so
a failure at any step leaves a record saying what happened (state and ``last_error``),
never a VM nobody knows about.

VM processes run detached from the runtime: :meth:`Runtime.close` (or the death of the
process) leaves them running. :meth:`Runtime.open` re-attaches to every sandbox that was
not at rest through its backend's ``attach``; a sandbox whose backend cannot re-attach, or
whose VM is gone, is marked crashed with the reason. A data directory is owned by one
runtime at a time (an advisory lock, released by the kernel when the process dies).

Everything the runtime depends on is injected (backend registry, image store, data
directory, clock, id source) so tests and the DST simulator drive this very code.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import enum
import fcntl
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from kelpie.api import SandboxCreate
from kelpie.images import (
    BlobProgress,
    ImageStore,
    NoDefaultCommand,
    StoredImage,
    pull_image,
    rootfs_ext4,
)
from kelpie.images._rootfs_build import BuildProgress
from kelpie.runtime._archive import read_archive, write_archive
from kelpie.runtime._db import (
    DB_FILENAME,
    IdInUse,
    SnapshotDb,
    StateDb,
    _sandbox_from_json,
    _sandbox_json,
)
from kelpie.runtime._errors import (
    AmbiguousSandbox,
    AmbiguousSnapshot,
    RuntimeLocked,
    RuntimeNotOpen,
    SandboxNameInUse,
    SandboxNotFound,
    SandboxStateError,
    SnapshotNotFound,
)
from kelpie.runtime._info import ACTIVE_STATES, SandboxEvent, SandboxInfo, SnapshotInfo
from kelpie.runtime._names import check_name, generated_name
from kelpie.vm import (
    DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
    BackendSpec,
    ConfigError,
    ExecExit,
    ExecOutput,
    ExecProcess,
    ExecResult,
    FileInfo,
    KelpieError,
    Mount,
    NetworkMode,
    PortMapping,
    SnapshotCorrupted,
    SnapshotKind,
    SnapshotManifest,
    VmConfig,
    VmFactory,
    VmInstance,
    VmSnapshot,
    VmState,
)
from kelpie.vm._snapshot import PARTIAL_SUFFIX

MIN_PREFIX_LENGTH = 3
ID_ATTEMPTS = 8
LOCK_FILENAME = "runtime.lock"
CONSOLE_LOG = "console.log"
OUTPUT_LOG = "output.log"
SANDBOXES_DIR = "sandboxes"
SNAPSHOTS_DIR = "snapshots"
TRASH_PREFIX = ".trash-"
FOLLOW_POLL_SECONDS = 0.2
AT_REST = (VmState.STOPPED, VmState.CRASHED)
STARTABLE = (VmState.CREATED, VmState.STOPPED, VmState.CRASHED)
EXIT_CANNOT_RUN = 127

E = TypeVar("E", bound=enum.StrEnum)

Progress = Callable[[str], None]
"""Receives one line of progress text per step of a long operation (on the event loop)."""


def _new_id() -> str:
    return secrets.token_hex(6)


class Runtime:
    """Creates, finds, drives and removes sandboxes; keeps their state in SQLite.

    ``data_dir`` holds the state database and the lock (default: Kelpie's state dir).
    ``factory`` picks backends (default: the built-in ones); ``backend_options`` maps a
    backend name to extra keyword arguments for its ``create`` (e.g. ``{"qemu": {"kit":
    kit}}``). ``images`` is the image store (default: ``<data_dir>/images``). ``clock``
    gives Unix time for the records; ``new_id`` gives fresh lowercase-hex sandbox ids.
    """

    def __init__(
        self,
        *,
        data_dir: Path | str | None = None,
        factory: VmFactory | None = None,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
        images: ImageStore | None = None,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = _new_id,
    ) -> None:
        if data_dir is None:
            from kelpie._paths import state_dir

            data_dir = state_dir()
        self.data_dir = Path(data_dir)
        self.factory = VmFactory() if factory is None else factory
        self._backend_options = {k: dict(v) for k, v in (backend_options or {}).items()}
        self._images = images
        self._clock = clock
        self._new_id = new_id
        self._db: StateDb | None = None
        self._lock_file: IO[str] | None = None
        self._vms: dict[str, VmInstance] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._mains: dict[str, asyncio.Task[None]] = {}

    # ---- lifecycle of the runtime itself ------------------------------------------------
    async def open(self) -> None:
        """Take ownership of the data directory, open the database, re-attach sandboxes."""
        if self._db is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(self.data_dir)
        try:
            self._db = StateDb(self.data_dir / DB_FILENAME)
            await self._recover()
        except BaseException:
            self._release()
            raise

    async def close(self) -> None:
        """Close the database and give up the data directory.

        Sandboxes are *not* stopped: VMs of backends that survive their runtime keep
        running (their connections are closed), and the next :meth:`open` re-attaches.
        """
        mains = list(self._mains.values())
        for task in mains:
            task.cancel()  # the main commands keep running in the guests
        await asyncio.gather(*mains, return_exceptions=True)
        for vm in list(self._vms.values()):
            with contextlib.suppress(Exception):
                await vm.detach()
        self._release()

    def _release(self) -> None:
        for task in self._mains.values():
            task.cancel()  # the command keeps running in the guest (see _run_main)
        self._mains.clear()
        self._vms.clear()
        self._locks.clear()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def db(self) -> StateDb:
        """The open state database; :class:`RuntimeNotOpen` before open or after close."""
        if self._db is None:
            raise RuntimeNotOpen()
        return self._db

    @property
    def images(self) -> ImageStore:
        """The image store sandboxes are created from."""
        if self._images is None:
            self._images = ImageStore(self.data_dir / "images")
        return self._images

    # ---- recovery -----------------------------------------------------------------------
    async def _recover(self) -> None:
        """Re-attach to every sandbox not at rest; mark the ones that cannot be crashed."""
        self._clean_snapshot_dir()
        for info in self.db.all():
            if info.state in AT_REST:
                continue
            reason = await self._reattach(info)
            if reason is not None:
                self.db.set_state(info.id, VmState.CRASHED, self._clock(), reason=reason)

    async def _reattach(self, info: SandboxInfo) -> str | None:
        """Reconnect to the VM of ``info``; return why not, or None when attached."""
        try:
            spec = self.factory.registry.get(info.backend)
        except KelpieError as exc:
            return f"backend {info.backend!r} is not available after a restart: {exc}"
        if spec.attach is None:
            return f"backend {info.backend!r} VMs do not survive a restart"
        try:
            vm = await spec.attach(info.id)
        except Exception as exc:
            return f"could not re-attach to the VM after a restart: {exc}"
        self._adopt(info.id, vm)
        self._record_state(vm, vm.state)
        self._follow_main(info.id, vm)
        return None

    def _follow_main(self, sandbox_id: str, vm: VmInstance) -> None:
        """Take over the output of a main command an earlier runtime started (if running)."""
        info = self._info(sandbox_id)
        if info.command is not None and info.main_exec_id is not None \
                and vm.state is VmState.RUNNING and sandbox_id not in self._mains:
            self._start_main(info, vm, follow=True)

    # ---- create -------------------------------------------------------------------------
    async def create(
        self, request: SandboxCreate | None = None, /, *, progress: Progress | None = None,
        **fields: Any,
    ) -> SandboxInfo:
        """Create a sandbox and start it; return its record once it runs.

        ``request`` is the one create request (:class:`kelpie.api.SandboxCreate`, also the
        REST body); in-process callers may give its fields as keywords instead.

        With ``template`` the sandbox starts by restoring that template instead of booting;
        its image and VM settings are the template's (only ``name``, ``env`` and
        ``labels`` may be given with it).

        ``image`` is a stored image (tag, digest or id prefix); without one the sandbox
        runs the guest kit's own userland. ``volumes`` are ``HOST:GUEST[:ro]`` strings;
        ``ports`` are ``[IP:]HOST:GUEST`` strings (published on 127.0.0.1 unless an IP is
        given). ``command`` is the sandbox's main command, run whenever the sandbox starts,
        its output kept as the sandbox's logs; the sandbox keeps running after it ends. An
        empty ``command`` means the image's default command. ``progress`` receives one
        line per step (image unpacking, disk building, boot).

        The record is written (state ``created``) before the VM starts; if the start
        fails, the record stays (state ``stopped`` or ``crashed``, with ``last_error``)
        and the error is raised.
        """
        if request is not None and fields:
            raise ConfigError([f"give the request or its fields, not both (got a request and "
                               f"{', '.join(sorted(fields))})"], what="sandbox")
        req = request if request is not None else SandboxCreate.from_fields(fields)
        if req.template is not None:
            fixed = {"image": req.image, "cpus": req.cpus, "memory_mib": req.memory_mib,
                     "volumes": req.volumes or None, "ports": req.ports or None,
                     "backend": req.backend, "hostname": req.hostname, "command": req.command,
                     "network": None if req.network == "none" else req.network}
            given = sorted(k for k, v in fixed.items() if v is not None)
            if given:
                raise ConfigError([f"{', '.join(given)} cannot be given with a template: the "
                                   "template fixes them (only name, env and labels may be)"],
                                  what="sandbox")
            return await self.restore(req.template, name=req.name, template=True,
                                      labels=req.labels, env=req.env)
        db = self.db
        spec = self.factory.select(req.backend)
        if req.name is not None:
            check_name(req.name)
            owner = db.find_by_name(req.name)
            if owner is not None:
                raise SandboxNameInUse(req.name, owner.id)
        stored = self.images.resolve(req.image) if req.image is not None else None
        main = _main_command(req.command, stored)
        config_mounts = tuple(_mount(v) for v in req.volumes)
        config_ports = tuple(_port(p) for p in req.ports)
        root_disk = None
        if stored is not None:
            root_disk = await asyncio.to_thread(
                rootfs_ext4, self.images, stored, progress=_build_reporter(progress),
            )
        config = VmConfig(
            vcpus=DEFAULT_VCPUS if req.cpus is None else req.cpus,
            memory_mib=DEFAULT_MEMORY_MIB if req.memory_mib is None else req.memory_mib,
            root_disk=root_disk,
            image=None if stored is None else _image_label(stored),
            mounts=config_mounts,
            ports=config_ports,
            env={**(stored.config.environment() if stored else {}), **(req.env or {})},
            network=_network(req.network),
            hostname=req.hostname,
        )
        info = self._insert(spec, req.name, config, stored, req.labels or {}, main)
        if progress is not None:
            progress(f"booting sandbox {info.name} ({info.short_id}) with {spec.name}")
        async with self._lock_for(info.id):
            await self._provision(spec, info, stored)
        return self._info(info.id)

    def _insert(
        self, spec: BackendSpec, name: str | None, config: VmConfig,
        stored: StoredImage | None, labels: Mapping[str, str],
        command: tuple[str, ...] | None,
    ) -> SandboxInfo:
        """Write the new record (state ``created``), retrying an id that is taken."""
        now = self._clock()
        for _ in range(ID_ATTEMPTS):
            sandbox_id = self._fresh_id()
            image_config = stored.config if stored is not None else None
            info = SandboxInfo(
                id=sandbox_id,
                name=name if name is not None else generated_name(sandbox_id),
                backend=spec.name,
                state=VmState.CREATED,
                config=config,
                image=config.image,
                image_digest=None if stored is None else stored.digest,
                workdir=(image_config.working_dir or None) if image_config else None,
                user=image_config.exec_user() if image_config else None,
                labels=dict(labels),
                created_at=now,
                updated_at=now,
                command=command,
                image_command=_image_command(stored),
                image_entrypoint=tuple(image_config.entrypoint or ()) if image_config else (),
            )
            try:
                self.db.insert(info)
            except IdInUse:
                continue
            except SandboxNameInUse:
                if name is None:
                    continue  # a generated name collided: another id gives another name
                raise
            return info
        raise ConfigError([f"could not find a free sandbox id in {ID_ATTEMPTS} attempts; "
                           "check the runtime's id source"], what="sandbox id")

    def _fresh_id(self) -> str:
        sandbox_id = self._new_id()
        if len(sandbox_id) < MIN_PREFIX_LENGTH or any(
            c not in "0123456789abcdef" for c in sandbox_id
        ):
            raise ConfigError([f"id source gave {sandbox_id!r}; sandbox ids are at least "
                               f"{MIN_PREFIX_LENGTH} lowercase hex digits"], what="sandbox id")
        return sandbox_id

    async def _provision(
        self, spec: BackendSpec, info: SandboxInfo, stored: StoredImage | None,
    ) -> None:
        """Hold the image, build the VM and start it; failures are kept in the record."""
        vm = self._new_vm(spec, info, stored)
        await self._start_vm(info.id, vm)

    def _new_vm(
        self, spec: BackendSpec, info: SandboxInfo, stored: StoredImage | None,
    ) -> VmInstance:
        """Hold the image and build the (not yet started) VM of a new sandbox record."""
        try:
            if stored is not None:
                self.images.retain(stored.digest, _holder(info.id))
            vm = spec.create(info.config, vm_id=info.id, **self._options(spec.name))
        except Exception as exc:
            self._fail(info.id, VmState.STOPPED, f"create failed: {exc}")
            raise
        self._adopt(info.id, vm)
        workdir = getattr(vm, "workdir", None)
        if isinstance(workdir, Path):
            self.db.set_vm_dir(info.id, workdir)
        return vm

    def _options(self, backend: str) -> dict[str, Any]:
        return dict(self._backend_options.get(backend, {}))

    async def _start_vm(self, sandbox_id: str, vm: VmInstance) -> None:
        try:
            await vm.start()
        except Exception as exc:  # the VM's observer has recorded stopped/crashed already
            self.db.set_error(sandbox_id, f"start failed: {exc}", self._clock())
            raise
        info = self._info(sandbox_id)
        if info.command is not None:
            self._start_main(info, vm)

    # ---- the main command ---------------------------------------------------------------
    def _start_main(self, info: SandboxInfo, vm: VmInstance, *, follow: bool = False) -> None:
        """Run the sandbox's main command in the background, its output into the log
        (``follow``: take over the one an earlier runtime started, by its exec id)."""
        if not follow:
            self.db.set_main_exit(info.id, None, self._clock())
        task = asyncio.create_task(self._run_main(info, vm, follow=follow),
                                   name=f"kelpie-main-{info.id}")
        self._mains[info.id] = task
        task.add_done_callback(lambda t: self._mains.pop(info.id, None)
                               if self._mains.get(info.id) is t else None)

    async def _run_main(self, info: SandboxInfo, vm: VmInstance, *, follow: bool) -> None:
        """Pump the main command's output into the sandbox's output log; record its exit.

        Cancelled when the sandbox stops or the runtime closes: the command itself is left
        running in the guest (``keep_running``), and its exec id is recorded so that the
        next runtime (e.g. a restarted daemon) takes its output over where it stopped.
        """
        assert info.command is not None
        path = self.output_log(info.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        exit_code: int | None = EXIT_CANNOT_RUN
        with path.open("ab", buffering=0) as log:
            try:
                async with self._main_process(info, vm, follow) as process:
                    if process.exec_id is not None:
                        self.db.set_main_exec(info.id, process.exec_id)
                    await process.close_stdin()
                    async for event in process:
                        if isinstance(event, ExecOutput):
                            log.write(event.data)
                        elif isinstance(event, ExecExit):
                            exit_code = event.exit_code
            except KelpieError as exc:
                what = "following" if follow else "the main command"
                log.write(f"kelpie: {what} failed: {exc}\n".encode())
                if follow:
                    exit_code = None  # unknown: its output could not be taken over
        if self._db is not None and self._vms.get(info.id) is vm:
            self.db.set_main_exit(info.id, exit_code, self._clock())

    @contextlib.asynccontextmanager
    async def _main_process(
        self, info: SandboxInfo, vm: VmInstance, follow: bool,
    ) -> AsyncIterator[ExecProcess]:
        assert info.command is not None
        if follow:
            assert info.main_exec_id is not None
            yield await vm.reattach_exec(info.main_exec_id)
            return
        async with vm.exec_stream(info.command, cwd=info.workdir, user=info.user,
                                  keep_running=True) as process:
            yield process

    async def wait_main(self, ref: str) -> int | None:
        """Wait for the sandbox's main command to end; its exit code (None if it has none,
        or it was not started by this runtime and has not been seen to end)."""
        info = self.get(ref)
        task = self._mains.get(info.id)
        if task is not None:
            await asyncio.shield(task)
        return self._info(info.id).main_exit_code

    def _stop_main(self, sandbox_id: str) -> None:
        task = self._mains.pop(sandbox_id, None)
        if task is not None:
            task.cancel()

    def output_log(self, sandbox_id: str) -> Path:
        """Where the main command's output of a sandbox is kept."""
        return self.data_dir / SANDBOXES_DIR / sandbox_id / OUTPUT_LOG

    def _fail(self, sandbox_id: str, state: VmState, error: str) -> None:
        now = self._clock()
        self.db.set_state(sandbox_id, state, now, reason=error)
        self.db.set_error(sandbox_id, error, now)

    # ---- observing VMs ------------------------------------------------------------------
    def _adopt(self, sandbox_id: str, vm: VmInstance) -> None:
        """Track ``vm`` as the VM of ``sandbox_id`` and record its state changes."""
        self._vms[sandbox_id] = vm
        vm.observe(self._on_transition)

    def _on_transition(self, vm: VmInstance, old: VmState, new: VmState) -> None:
        if self._db is None or self._vms.get(vm.id) is not vm:
            return  # a VM this runtime no longer owns (closed, or removed)
        self._record_state(vm, new)

    def _record_state(self, vm: VmInstance, state: VmState) -> None:
        reason = vm.crash_reason if state is VmState.CRASHED else None
        self.db.set_state(vm.id, state, self._clock(), reason=reason)

    # ---- finding ------------------------------------------------------------------------
    def list(self, *, all: bool = False) -> builtins.list[SandboxInfo]:
        """Sandboxes, oldest first: the active ones, or with ``all`` also those at rest."""
        return [i for i in self.db.all() if all or i.state in ACTIVE_STATES]

    def get(self, ref: str) -> SandboxInfo:
        """The sandbox named ``ref``, with id ``ref``, or whose id starts with ``ref``.

        An id prefix must have at least 3 characters and match one sandbox only.
        """
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

    def history(self, ref: str) -> builtins.list[SandboxEvent]:
        """The recorded state changes of a sandbox, oldest first."""
        return self.db.events(self.get(ref).id)

    def _info(self, sandbox_id: str) -> SandboxInfo:
        info = self.db.get(sandbox_id)
        if info is None:
            raise SandboxNotFound(sandbox_id)
        return info

    def _lock_for(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _vm(self, info: SandboxInfo, operation: str) -> VmInstance:
        """The live VM of a sandbox; a sandbox at rest has none."""
        vm = self._vms.get(info.id)
        if vm is None:
            raise SandboxStateError(
                _label(info), operation, info.state, [VmState.RUNNING],
                f"; start it first (Runtime.start({info.name!r}))",
            )
        return vm

    # ---- commands and files -------------------------------------------------------------
    async def exec(
        self,
        ref: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to completion in a running sandbox (image workdir/user by default)."""
        info = self.get(ref)
        vm = self._vm(info, "exec in")
        return await vm.exec(argv, env=env, cwd=cwd or info.workdir, stdin=stdin,
                             timeout=timeout, user=user or info.user)

    @contextlib.asynccontextmanager
    async def exec_stream(
        self,
        ref: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        pty: bool = False,
    ) -> AsyncIterator[ExecProcess]:
        """Start a command and yield its process; leaving the block early kills it."""
        info = self.get(ref)
        vm = self._vm(info, "exec in")
        async with vm.exec_stream(argv, env=env, cwd=cwd or info.workdir, timeout=timeout,
                                  user=user or info.user, pty=pty) as process:
            yield process

    async def read_file(self, ref: str, path: str) -> bytes:
        """Read a whole file from a running sandbox."""
        return await self._vm(self.get(ref), "read files in").read_file(path)

    async def read_file_stream(self, ref: str, path: str) -> AsyncIterator[bytes]:
        """Read a file from a running sandbox in chunks."""
        vm = self._vm(self.get(ref), "read files in")
        async for chunk in vm.read_file_stream(path):
            yield chunk

    async def write_file(
        self, ref: str, path: str, data: bytes | AsyncIterable[bytes], *, mode: int = 0o644,
    ) -> None:
        """Write a file in a running sandbox atomically (from bytes or a stream of chunks)."""
        await self._vm(self.get(ref), "write files in").write_file(path, data, mode=mode)

    async def list_dir(self, ref: str, path: str) -> builtins.list[FileInfo]:
        """List a directory in a running sandbox."""
        return await self._vm(self.get(ref), "list files in").list_dir(path)

    async def mkdir(self, ref: str, path: str, *, mode: int = 0o755) -> None:
        """Create a directory (and missing parents) in a running sandbox."""
        await self._vm(self.get(ref), "create directories in").mkdir(path, mode=mode)

    async def remove_path(self, ref: str, path: str, *, recursive: bool = False) -> None:
        """Remove a file (or with ``recursive`` a tree) in a running sandbox."""
        await self._vm(self.get(ref), "remove files in").remove(path, recursive=recursive)

    # ---- lifecycle of sandboxes ---------------------------------------------------------
    async def pause(self, ref: str) -> SandboxInfo:
        """Freeze a running sandbox's vCPUs."""
        info = self.get(ref)
        async with self._lock_for(info.id):
            await self._vm(info, "pause").pause()
        return self._info(info.id)

    async def resume(self, ref: str) -> SandboxInfo:
        """Let a paused sandbox run again."""
        info = self.get(ref)
        async with self._lock_for(info.id):
            vm = self._vm(info, "resume")
            await vm.resume()
            self._follow_main(info.id, vm)
        return self._info(info.id)

    async def stop(self, ref: str, *, timeout: float | None = None) -> SandboxInfo:
        """Shut a sandbox down (a no-op when it is at rest).

        ``timeout=0`` kills the VM at once; otherwise the guest gets ``timeout`` seconds
        (the backend's default when None) to shut down gracefully before it is stopped hard.
        """
        info = self.get(ref)
        async with self._lock_for(info.id):
            self._stop_main(info.id)
            vm = self._vms.get(info.id)
            if vm is not None:
                await vm.stop(grace=None if timeout is None else max(timeout, 0.0))
            elif info.state not in AT_REST:  # pragma: no cover - recovery settles these
                self.db.set_state(info.id, VmState.STOPPED, self._clock())
        return self._info(info.id)

    async def start(self, ref: str) -> SandboxInfo:
        """Start a sandbox that is stopped or crashed (with a fresh VM if it has none)."""
        info = self.get(ref)
        async with self._lock_for(info.id):
            info = self._info(info.id)
            if info.state not in STARTABLE:
                raise SandboxStateError(_label(info), "start", info.state, STARTABLE)
            vm = self._vms.get(info.id)
            if vm is not None and vm.state is VmState.CRASHED:
                await vm.stop(force=True)  # release what the dead VM held; CRASHED -> STOPPED
            if vm is None:
                spec = self.factory.registry.get(info.backend)
                vm = spec.create(info.config, vm_id=info.id, **self._options(spec.name))
                self._adopt(info.id, vm)
            await self._start_vm(info.id, vm)
        return self._info(info.id)

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """Delete a sandbox: its VM (killed with ``force``), VM directory, image hold, record.

        A sandbox that is running or paused is removed only with ``force``. The record is
        deleted last, so a failure part-way leaves it in place to retry.
        """
        info = self.get(ref)
        async with self._lock_for(info.id):
            info = self._info(info.id)
            vm = self._vms.get(info.id)
            # A VM that crashed is at rest like a stopped one: no force needed.
            live = vm is not None and vm.state not in (*AT_REST, VmState.CREATED)
            if live and not force:
                raise SandboxStateError(
                    _label(info), "remove", info.state, AT_REST,
                    "; stop it first, or remove it with force",
                )
            self._stop_main(info.id)
            if vm is not None and vm.state is not VmState.STOPPED:
                await vm.stop(force=True)
            self._vms.pop(info.id, None)
            self._delete_leftovers(info)
            self.db.delete(info.id)
        self._locks.pop(info.id, None)

    def _delete_leftovers(self, info: SandboxInfo) -> None:
        """Release the image and delete the VM directory of a stopped sandbox."""
        if info.image_digest is not None:
            self.images.release(info.image_digest, _holder(info.id))
        if info.vm_dir is not None and info.vm_dir.exists():
            shutil.rmtree(info.vm_dir)
        own_dir = self.output_log(info.id).parent
        if own_dir.exists():
            shutil.rmtree(own_dir)

    # ---- snapshots and templates --------------------------------------------------------
    @property
    def snapshots_dir(self) -> Path:
        """Where complete snapshots live, one directory per snapshot id."""
        return self.data_dir / SNAPSHOTS_DIR

    @property
    def _snapshot_db(self) -> SnapshotDb:
        return SnapshotDb(self.db)

    def _clean_snapshot_dir(self) -> None:
        """Remove what a crash left: partial and trashed snapshots, and unrecorded ones
        (a snapshot is recorded only after it is complete, so these are never valid)."""
        if not self.snapshots_dir.is_dir():
            return
        known = {s.id for s in self._snapshot_db.all()}
        for entry in self.snapshots_dir.iterdir():
            if entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)

    def _with_path(self, info: SnapshotInfo) -> SnapshotInfo:
        return dataclasses.replace(info, path=self.snapshots_dir / info.id)

    def snapshots(self, *, templates: bool | None = None) -> builtins.list[SnapshotInfo]:
        """Snapshots, oldest first: all, only templates (True) or only plain ones (False)."""
        return [self._with_path(s) for s in self._snapshot_db.all()
                if templates is None or s.template == templates]

    def get_snapshot(self, ref: str, *, template: bool | None = None) -> SnapshotInfo:
        """The snapshot (or template) with this name, id, or unique id prefix (>= 3)."""
        what = "template" if template else "snapshot"
        db = self._snapshot_db
        found = db.find_by_name(ref) or db.get(ref)
        if found is None and len(ref) >= MIN_PREFIX_LENGTH:
            matches = db.find_by_id_prefix(ref)
            if len(matches) > 1:
                raise AmbiguousSnapshot(ref, [(m.id, m.name) for m in matches])
            found = matches[0] if matches else None
        if found is None or (template is not None and found.template != template):
            raise SnapshotNotFound(ref, what)
        return self._with_path(found)

    async def snapshot(
        self, ref: str, *, name: str | None = None, kind: SnapshotKind | str = "full",
        leave_paused: bool = False, template: bool = False, workspace: str | None = None,
    ) -> SnapshotInfo:
        """Snapshot a sandbox: ``full`` (memory + devices + disk; running or paused),
        ``disk`` (a stopped sandbox's disk) or ``checkpoint`` (a running sandbox's
        ``workspace`` directory + env, restorable on any arch; default: the image's working
        directory, else ``/workspace``). The sandbox ends running again (or paused with
        ``leave_paused``). The snapshot is recorded only once complete."""
        snapshot_kind = _snapshot_kind(kind)
        info = self.get(ref)
        snapshot_id = self._fresh_snapshot_id()
        name = name or f"{info.name}-{snapshot_id[:6]}"
        check_name(name)
        if self._snapshot_db.find_by_name(name) is not None:
            from kelpie.runtime._errors import SnapshotNameInUse

            raise SnapshotNameInUse(name)
        dest = self.snapshots_dir / snapshot_id
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        async with self._lock_for(info.id):
            info = self._info(info.id)
            vm = self._vms.get(info.id)
            if vm is None:
                if snapshot_kind is not SnapshotKind.DISK:
                    raise SandboxStateError(_label(info), "take a full snapshot of",
                                            info.state, [VmState.RUNNING, VmState.PAUSED])
                spec = self.factory.registry.get(info.backend)
                vm = spec.create(info.config, vm_id=info.id, **self._options(spec.name))
                self._adopt(info.id, vm)
            if snapshot_kind is SnapshotKind.CHECKPOINT:
                vm.checkpoint_workspace = workspace or _workspace_of(info)
            taken = await vm.snapshot(dest, kind=snapshot_kind, leave_paused=leave_paused)
        record = SnapshotInfo(
            id=snapshot_id, name=name, kind=snapshot_kind, backend=info.backend,
            sandbox=info, template=template, sandbox_id=info.id, sandbox_name=info.name,
            image=info.image, image_digest=info.image_digest,
            size=sum(b.size for b in taken.manifest.blobs.values()), created_at=self._clock(),
        )
        self._record_snapshot(record)
        return self._with_path(record)

    def _record_snapshot(self, record: SnapshotInfo) -> None:
        """Hold the snapshot's image and record it; on failure remove its directory."""
        try:
            if record.image_digest is not None:
                self.images.retain(record.image_digest, _snapshot_holder(record.id))
            self._snapshot_db.insert(record)
        except BaseException:
            if record.image_digest is not None:
                self.images.release(record.image_digest, _snapshot_holder(record.id))
            shutil.rmtree(self.snapshots_dir / record.id, ignore_errors=True)
            raise

    def _fresh_snapshot_id(self) -> str:
        for _ in range(ID_ATTEMPTS):
            candidate = self._fresh_id()
            if self._snapshot_db.get(candidate) is None and not (
                self.snapshots_dir / candidate
            ).exists():
                return candidate
        raise ConfigError([f"could not find a free snapshot id in {ID_ATTEMPTS} attempts"],
                          what="snapshot id")

    def remove_snapshot(self, ref: str, *, template: bool | None = None) -> SnapshotInfo:
        """Delete a snapshot: its directory goes to the trash (atomically), then its record,
        then the trash; a crash part-way leaves either the whole snapshot or none."""
        info = self.get_snapshot(ref, template=template)
        path = self.snapshots_dir / info.id
        trash = self.snapshots_dir / f"{TRASH_PREFIX}{info.id}"
        if path.exists():
            path.rename(trash)
        self._snapshot_db.delete(info.id)
        if info.image_digest is not None:
            self.images.release(info.image_digest, _snapshot_holder(info.id))
        shutil.rmtree(trash, ignore_errors=True)
        return info

    async def export_snapshot(self, ref: str, out: IO[bytes], *, compress: bool = False,
                              ) -> None:
        """Write a snapshot as one archive (see :mod:`kelpie.runtime._archive`)."""
        info = self.get_snapshot(ref)
        meta = {"name": info.name, "kind": info.kind.value, "template": info.template,
                "backend": info.backend, "image": info.image, "image_digest": info.image_digest,
                "sandbox_id": info.sandbox_id, "sandbox_name": info.sandbox_name,
                "created_at": info.created_at, "sandbox": _sandbox_json(info.sandbox)}
        assert info.path is not None
        await asyncio.to_thread(write_archive, out, info.path, meta, compress=compress)

    async def import_snapshot(self, source: IO[bytes], *, name: str | None = None,
                              ) -> SnapshotInfo:
        """Add a snapshot from an archive; every blob is verified before it is listed."""
        snapshot_id = self._fresh_snapshot_id()
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        partial = self.snapshots_dir / f".import-{snapshot_id}{PARTIAL_SUFFIX}"
        try:
            meta, manifest = await asyncio.to_thread(_unpack_verified, source, partial)
            try:
                kind = SnapshotKind(meta["kind"])
                sandbox = _sandbox_from_json(meta["sandbox"], str(meta["backend"]),
                                             meta.get("image"), meta.get("image_digest"))
                record = SnapshotInfo(
                    id=snapshot_id, name=name or str(meta["name"]), kind=kind,
                    backend=str(meta["backend"]), sandbox=sandbox,
                    template=bool(meta.get("template")), sandbox_id=meta.get("sandbox_id"),
                    sandbox_name=meta.get("sandbox_name"), image=meta.get("image"),
                    image_digest=meta.get("image_digest"),
                    size=sum(b.size for b in manifest.blobs.values()),
                    created_at=float(meta.get("created_at") or self._clock()),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise SnapshotCorrupted(f"snapshot archive metadata is invalid: {exc}") from None
            check_name(record.name)
            if self._snapshot_db.find_by_name(record.name) is not None:
                from kelpie.runtime._errors import SnapshotNameInUse

                raise SnapshotNameInUse(record.name)
            partial.rename(self.snapshots_dir / snapshot_id)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self._record_snapshot(record)
        return self._with_path(record)

    async def restore(
        self, ref: str, *, name: str | None = None, paused: bool = False,
        template: bool | None = None, labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> SandboxInfo:
        """Create a new sandbox from a snapshot (or template), as it was when captured.

        ``env`` adds variables for the commands run in it (the VM itself is unchanged).

        The snapshot is verified and its compatibility with this host checked before the
        VM starts; the new sandbox gets a new id, name and guest identity. A full snapshot
        comes back running (or ``paused``); a disk snapshot boots from the saved disk.
        """
        snap = self.get_snapshot(ref, template=template)
        assert snap.path is not None
        source = VmSnapshot.open(snap.path)
        spec = self.factory.registry.get(snap.backend)
        if name is not None:
            check_name(name)
            owner = self.db.find_by_name(name)
            if owner is not None:
                raise SandboxNameInUse(name, owner.id)
        stored = None
        if snap.image_digest is not None:
            stored = self.images.get(snap.image_digest)  # ImageNotFound names the digest
        base = snap.sandbox
        config = base.config.evolve(env={**base.config.env, **(env or {})}) if env else \
            base.config
        info = self._insert(spec, name, config, stored, {**base.labels, **(labels or {})},
                            base.command if snap.kind is SnapshotKind.DISK else None)
        async with self._lock_for(info.id):
            vm = self._new_vm(spec, info, stored)
            try:
                await vm.restore(source, paused=paused)
            except Exception as exc:
                self.db.set_error(info.id, f"restore failed: {exc}", self._clock())
                if vm.state is VmState.CREATED:
                    self._fail(info.id, VmState.STOPPED, f"restore failed: {exc}")
                raise
        return self._info(info.id)

    async def restore_into(self, sandbox: str, snapshot: str, *, paused: bool = False,
                           ) -> SandboxInfo:
        """Roll a sandbox back to one of its own snapshots (same id, name and identity).

        The sandbox must be at rest (stop it first); the snapshot must have been taken
        from it. Everything is verified before the VM starts.
        """
        info = self.get(sandbox)
        snap = self.get_snapshot(snapshot)
        if snap.sandbox_id != info.id:
            raise ConfigError([f"snapshot {snap.name} was taken from sandbox "
                               f"{snap.sandbox_name} ({snap.sandbox_id}), not from "
                               f"{_label(info)}; restore it into a new sandbox instead"],
                              what="restore")
        assert snap.path is not None
        source = VmSnapshot.open(snap.path)
        async with self._lock_for(info.id):
            info = self._info(info.id)
            if info.state not in AT_REST:
                raise SandboxStateError(_label(info), "restore into", info.state, AT_REST,
                                        "; stop it first")
            self._stop_main(info.id)
            vm = self._vms.get(info.id)
            if vm is not None and vm.state is VmState.CRASHED:
                await vm.stop(force=True)
            if vm is None:
                spec = self.factory.registry.get(info.backend)
                vm = spec.create(info.config, vm_id=info.id, **self._options(spec.name))
                self._adopt(info.id, vm)
            try:
                await vm.restore(source, paused=paused)
            except Exception as exc:
                self.db.set_error(info.id, f"restore failed: {exc}", self._clock())
                raise
            if snap.kind is SnapshotKind.DISK and info.command is not None:
                self._start_main(self._info(info.id), vm)
        return self._info(info.id)

    async def create_template(
        self, *, name: str, image: str | None = None, cpus: int | None = None,
        memory_mib: int | None = None, env: Mapping[str, str] | None = None,
        network: NetworkMode | str = "none", backend: str | None = None,
        progress: Progress | None = None,
    ) -> SnapshotInfo:
        """Boot a sandbox once, snapshot it as template ``name``, remove the sandbox.

        Sandboxes created from the template (``create(template=name)``) start by
        restoring it instead of booting.
        """
        check_name(name)
        if self._snapshot_db.find_by_name(name) is not None:
            from kelpie.runtime._errors import SnapshotNameInUse

            raise SnapshotNameInUse(name)
        info = await self.create(SandboxCreate(
            image=image, cpus=cpus, memory_mib=memory_mib, env=dict(env or {}),
            network=_network(network).value, backend=backend,
            labels={"kelpie.template-build": name}), progress=progress)
        try:
            if progress is not None:
                progress(f"snapshotting {info.name} as template {name}")
            return await self.snapshot(info.id, name=name, template=True)
        finally:
            await self.remove(info.id, force=True)

    # ---- console logs -------------------------------------------------------------------
    def log_path(self, info: SandboxInfo, *, console: bool = False) -> Path | None:
        """The file :meth:`logs` reads: the main command's output, else the VM console."""
        if info.command is not None and not console:
            return self.output_log(info.id)
        return _console(info)

    def logs(self, ref: str, *, tail: int | None = None, console: bool = False) -> bytes:
        """The sandbox's logs (the last ``tail`` lines if given); empty if none yet.

        The logs are the main command's output when the sandbox has one, else (or with
        ``console``) the VM's console (kernel and init messages).
        """
        data, _ = self._read_logs(self.get(ref), tail, console)
        return data

    def _read_logs(
        self, info: SandboxInfo, tail: int | None, console: bool,
    ) -> tuple[bytes, int]:
        """The logs (or their last ``tail`` lines) and the offset they were read up to."""
        if tail is not None and tail < 0:
            raise ConfigError([f"tail is {tail}; give a number of lines >= 0"], what="logs")
        data, offset = _read_from(self.log_path(info, console=console), 0, limit=None)
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
        return data, offset

    async def follow_logs(
        self, ref: str, *, tail: int | None = None, console: bool = False,
        poll_seconds: float = FOLLOW_POLL_SECONDS,
    ) -> AsyncIterator[bytes]:
        """Yield the logs (or their last ``tail`` lines), then what is written from then on,
        until the sandbox is at rest or gone."""
        info = self.get(ref)
        path = self.log_path(info, console=console)
        data, offset = self._read_logs(info, tail, console)
        if data:
            yield data
        while True:
            chunk, offset = _read_from(path, offset)
            if chunk:
                yield chunk
                continue
            current = self.db.get(info.id)
            if current is None or current.state in AT_REST:
                return
            await asyncio.sleep(poll_seconds)


    # ---- the rest of the sandbox service (kelpie.service.SandboxService) ----------------
    # Async forms of the in-process queries above, so that this runtime and a daemon's
    # client answer the same calls; the records are the runtime's own.
    async def inspect(self, ref: str) -> SandboxInfo:
        """The sandbox with this name, id or unique id prefix (see :meth:`get`)."""
        return self.get(ref)

    async def list_sandboxes(self, *, all: bool = False) -> builtins.list[SandboxInfo]:
        """Active sandboxes (``all``: every one), see :meth:`list`."""
        return self.list(all=all)

    async def kill(self, ref: str) -> SandboxInfo:
        """Stop a sandbox at once (its VM is killed)."""
        return await self.stop(ref, timeout=0)

    async def events(self, ref: str) -> builtins.list[SandboxEvent]:
        """The sandbox's recorded state changes, oldest first (see :meth:`history`)."""
        return self.history(ref)

    async def read_logs(self, ref: str, *, tail: int | None = None,
                        console: bool = False) -> bytes:
        """The sandbox's logs so far (see :meth:`logs`)."""
        return self.logs(ref, tail=tail, console=console)

    async def list_snapshots(self, *, templates: bool | None = None,
                             ) -> builtins.list[SnapshotInfo]:
        """Snapshots, oldest first (see :meth:`snapshots`)."""
        return self.snapshots(templates=templates)

    async def inspect_snapshot(self, ref: str) -> SnapshotInfo:
        """The snapshot or template with this name, id or unique id prefix."""
        return self.get_snapshot(ref)

    async def delete_snapshot(self, ref: str, *, template: bool = False) -> None:
        """Delete a snapshot or template (``template``: only a template)."""
        self.remove_snapshot(ref, template=True if template else None)

    async def list_images(self) -> builtins.list[StoredImage]:
        """The images in the image store."""
        return self.images.list()

    async def inspect_image(self, ref: str) -> StoredImage:
        """One stored image by tag, digest or id prefix."""
        return self.images.resolve(ref)

    async def remove_image(self, ref: str, *, force: bool = False) -> builtins.list[str]:
        """Untag or delete a stored image; the digests deleted."""
        return self.images.remove(ref, force=force)

    async def pull_image(self, reference: str, *, platform: str | None = None,
                         insecure: bool = False, progress: BlobProgress | None = None,
                         ) -> StoredImage:
        """Pull an image from a registry into the image store (see
        :func:`kelpie.images.pull_image`)."""
        return await pull_image(self.images, reference, platform=platform, insecure=insecure,
                                progress=progress)

def _lock(data_dir: Path) -> IO[str]:
    """Take the data directory's exclusive lock, or say who holds it."""
    lock_file = (data_dir / LOCK_FILENAME).open("a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        owner = lock_file.read().strip()
        lock_file.close()
        raise RuntimeLocked(data_dir, owner) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"pid {os.getpid()}\n")
    lock_file.flush()
    return lock_file


def _mount(volume: Mount | str) -> Mount:
    """A :class:`Mount` from itself or from ``HOST:GUEST[:ro|rw]``."""
    if isinstance(volume, Mount):
        return volume
    host, sep, rest = volume.partition(":")
    guest, _, mode = rest.partition(":")
    if not sep or not host or not guest or mode not in ("", "ro", "rw"):
        raise ConfigError([f"volume {volume!r}: expected HOST:GUEST or HOST:GUEST:ro|rw"],
                          what="volume")
    return Mount(Path(host).resolve(), guest, read_only=mode == "ro")


def _port(port: PortMapping | str) -> PortMapping:
    """A :class:`PortMapping` from itself or from ``[IP:]HOST:GUEST[/tcp|udp]``."""
    return port if isinstance(port, PortMapping) else PortMapping.parse(port)


def _main_command(
    command: Sequence[str] | None, stored: StoredImage | None,
) -> tuple[str, ...] | None:
    """The main command to record: None for none; with an image, Docker's rule
    (entrypoint + the command, or + the image's cmd when the command is empty)."""
    if command is None:
        return None
    if stored is not None:
        return tuple(stored.config.command(command or None))
    if not command:
        raise ConfigError(["an empty main command needs an image with a default command; "
                           "give a command"], what="sandbox command")
    return tuple(command)


def _image_command(stored: StoredImage | None) -> tuple[str, ...] | None:
    """The image's default command, or None when it has none."""
    if stored is None:
        return None
    try:
        return tuple(stored.config.command(None))
    except NoDefaultCommand:
        return None


def _build_reporter(progress: Progress | None) -> Callable[[BuildProgress], None] | None:
    """Turn root-disk build steps (reported on a worker thread) into progress lines."""
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def report(step: BuildProgress) -> None:
        if step.stage == "layer" and step.current < step.total:
            line = f"unpacking layer {step.current + 1}/{step.total}"
        elif step.stage == "ext4" and step.current == 0:
            line = "building the ext4 root disk"
        else:
            return
        loop.call_soon_threadsafe(progress, line)

    return report


def _network(mode: NetworkMode | str) -> NetworkMode:
    return _member(NetworkMode, mode, "network", "sandbox network")


def _member(kind: type[E], value: E | str, field: str, what: str) -> E:
    """``value`` as a member of the string enum ``kind``; a ConfigError lists the allowed."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ConfigError([f"{field} {value!r} is not known; allowed: {allowed}"],
                          what=what) from None


def _image_label(image: StoredImage) -> str:
    """How a sandbox records its image: ``name@digest`` when tagged, else the digest."""
    if not image.tags:
        return image.digest
    return f"{image.tags[0].rpartition(':')[0]}@{image.digest}"


def _holder(sandbox_id: str) -> str:
    return f"sandbox:{sandbox_id}"


def _unpack_verified(source: IO[bytes], dest: Path) -> tuple[dict[str, Any], SnapshotManifest]:
    """Unpack an archive and verify every blob against its manifest (a worker thread)."""
    meta, manifest = read_archive(source, dest)
    VmSnapshot(dest, manifest).verify()
    return meta, manifest


def _snapshot_holder(snapshot_id: str) -> str:
    return f"snapshot:{snapshot_id}"


def _workspace_of(info: SandboxInfo) -> str:
    """The directory a checkpoint keeps by default: the image's working directory."""
    return info.workdir if info.workdir and info.workdir != "/" else "/workspace"


def _snapshot_kind(kind: SnapshotKind | str) -> SnapshotKind:
    return _member(SnapshotKind, kind, "snapshot kind", "snapshot")


def _label(info: SandboxInfo) -> str:
    return f"{info.name} ({info.short_id})"


def _console(info: SandboxInfo) -> Path | None:
    return None if info.vm_dir is None else info.vm_dir / CONSOLE_LOG


def _read_from(path: Path | None, offset: int, *, limit: int | None = 1 << 20,
               ) -> tuple[bytes, int]:
    """Bytes of ``path`` after ``offset`` (from 0 again if the file was truncated)."""
    if path is None:
        return b"", offset
    try:
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) < offset:
                offset = 0
            f.seek(offset)
            chunk = f.read(-1 if limit is None else limit)
    except FileNotFoundError:
        return b"", offset
    return chunk, offset + len(chunk)
