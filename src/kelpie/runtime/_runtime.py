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
import fcntl
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from kelpie.images import ImageStore, StoredImage, rootfs_ext4
from kelpie.runtime._db import DB_FILENAME, IdInUse, StateDb
from kelpie.runtime._errors import (
    AmbiguousSandbox,
    RuntimeLocked,
    RuntimeNotOpen,
    SandboxNameInUse,
    SandboxNotFound,
    SandboxStateError,
)
from kelpie.runtime._info import ACTIVE_STATES, SandboxEvent, SandboxInfo
from kelpie.runtime._names import check_name, generated_name
from kelpie.vm import (
    DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
    BackendSpec,
    ConfigError,
    ExecProcess,
    ExecResult,
    FileInfo,
    KelpieError,
    Mount,
    NetworkMode,
    VmConfig,
    VmFactory,
    VmInstance,
    VmState,
)

MIN_PREFIX_LENGTH = 3
ID_ATTEMPTS = 8
LOCK_FILENAME = "runtime.lock"
CONSOLE_LOG = "console.log"
FOLLOW_POLL_SECONDS = 0.2
AT_REST = (VmState.STOPPED, VmState.CRASHED)
STARTABLE = (VmState.CREATED, VmState.STOPPED, VmState.CRASHED)


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
        if factory is None:
            import kelpie.backends  # noqa: F401  (registers the built-in backends)

            factory = VmFactory()
        self.factory = factory
        self._backend_options = {k: dict(v) for k, v in (backend_options or {}).items()}
        self._images = images
        self._clock = clock
        self._new_id = new_id
        self._db: StateDb | None = None
        self._lock_file: IO[str] | None = None
        self._vms: dict[str, VmInstance] = {}
        self._locks: dict[str, asyncio.Lock] = {}

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
        running, and the next :meth:`open` re-attaches to them.
        """
        self._release()

    def _release(self) -> None:
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
        return None

    # ---- create -------------------------------------------------------------------------
    async def create(
        self,
        *,
        image: str | None = None,
        name: str | None = None,
        cpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[Mount | str] = (),
        network: NetworkMode | str = "none",
        backend: str | None = None,
        hostname: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> SandboxInfo:
        """Create a sandbox and start it; return its record once it runs.

        ``image`` is a stored image (tag, digest or id prefix); without one the sandbox
        runs the guest kit's own userland. ``volumes`` are :class:`Mount` objects or
        ``HOST:GUEST[:ro]`` strings. The record is written (state ``created``) before the
        VM starts; if the start fails, the record stays (state ``stopped`` or ``crashed``,
        with ``last_error``) and the error is raised.
        """
        db = self.db
        spec = self.factory.select(backend)
        if name is not None:
            check_name(name)
            owner = db.find_by_name(name)
            if owner is not None:
                raise SandboxNameInUse(name, owner.id)
        stored = self.images.resolve(image) if image is not None else None
        root_disk = None
        if stored is not None:
            root_disk = await asyncio.to_thread(rootfs_ext4, self.images, stored)
        config = VmConfig(
            vcpus=DEFAULT_VCPUS if cpus is None else cpus,
            memory_mib=DEFAULT_MEMORY_MIB if memory_mib is None else memory_mib,
            root_disk=root_disk,
            image=None if stored is None else _image_label(stored),
            mounts=tuple(_mount(v) for v in volumes),
            env={**(stored.config.environment() if stored else {}), **(env or {})},
            network=_network(network),
            hostname=hostname,
        )
        info = self._insert(spec, name, config, stored, labels or {})
        async with self._lock_for(info.id):
            await self._provision(spec, info, stored)
        return self._info(info.id)

    def _insert(
        self, spec: BackendSpec, name: str | None, config: VmConfig,
        stored: StoredImage | None, labels: Mapping[str, str],
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
        await self._start_vm(info.id, vm)

    def _options(self, backend: str) -> dict[str, Any]:
        return dict(self._backend_options.get(backend, {}))

    async def _start_vm(self, sandbox_id: str, vm: VmInstance) -> None:
        try:
            await vm.start()
        except Exception as exc:  # the VM's observer has recorded stopped/crashed already
            self.db.set_error(sandbox_id, f"start failed: {exc}", self._clock())
            raise

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

    async def write_file(self, ref: str, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write a file in a running sandbox atomically."""
        await self._vm(self.get(ref), "write files in").write_file(path, data, mode=mode)

    async def list_dir(self, ref: str, path: str) -> builtins.list[FileInfo]:
        """List a directory in a running sandbox."""
        return await self._vm(self.get(ref), "list files in").list_dir(path)

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
            await self._vm(info, "resume").resume()
        return self._info(info.id)

    async def stop(self, ref: str, *, timeout: float | None = None) -> SandboxInfo:
        """Shut a sandbox down (a no-op when it is at rest).

        ``timeout=0`` kills the VM at once; otherwise the guest gets a graceful shutdown,
        bounded by the backend's own shutdown timeout.
        """
        info = self.get(ref)
        async with self._lock_for(info.id):
            vm = self._vms.get(info.id)
            if vm is not None:
                await vm.stop(force=timeout is not None and timeout <= 0)
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
            live = vm is not None and vm.state not in (VmState.STOPPED, VmState.CREATED)
            if live and not force:
                raise SandboxStateError(
                    _label(info), "remove", info.state, AT_REST,
                    "; stop it first, or remove it with force",
                )
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

    # ---- console logs -------------------------------------------------------------------
    def logs(self, ref: str, *, tail: int | None = None) -> bytes:
        """The sandbox's console log (the last ``tail`` lines if given); empty if none."""
        if tail is not None and tail < 0:
            raise ConfigError([f"tail is {tail}; give a number of lines >= 0"], what="logs")
        path = _console(self.get(ref))
        try:
            data = path.read_bytes() if path is not None else b""
        except FileNotFoundError:
            data = b""
        if tail is None:
            return data
        lines = data.splitlines(keepends=True)
        return b"".join(lines[-tail:]) if tail else b""

    async def follow_logs(
        self, ref: str, *, poll_seconds: float = FOLLOW_POLL_SECONDS,
    ) -> AsyncIterator[bytes]:
        """Yield console output written from now on, until the sandbox is at rest or gone."""
        info = self.get(ref)
        path = _console(info)
        offset = _size(path)
        while True:
            chunk, offset = _read_from(path, offset)
            if chunk:
                yield chunk
                continue
            current = self.db.get(info.id)
            if current is None or current.state in AT_REST:
                return
            await asyncio.sleep(poll_seconds)


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


def _network(mode: NetworkMode | str) -> NetworkMode:
    try:
        return NetworkMode(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in NetworkMode)
        raise ConfigError([f"network {mode!r} is not a network mode; allowed: {allowed}"],
                          what="sandbox network") from None


def _image_label(image: StoredImage) -> str:
    """How a sandbox records its image: ``name@digest`` when tagged, else the digest."""
    if not image.tags:
        return image.digest
    return f"{image.tags[0].rpartition(':')[0]}@{image.digest}"


def _holder(sandbox_id: str) -> str:
    return f"sandbox:{sandbox_id}"


def _label(info: SandboxInfo) -> str:
    return f"{info.name} ({info.short_id})"


def _console(info: SandboxInfo) -> Path | None:
    return None if info.vm_dir is None else info.vm_dir / CONSOLE_LOG


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except FileNotFoundError:
        return 0


def _read_from(path: Path | None, offset: int) -> tuple[bytes, int]:
    """Bytes of ``path`` after ``offset`` (from 0 again if the file was truncated)."""
    if path is None:
        return b"", offset
    try:
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) < offset:
                offset = 0
            f.seek(offset)
            chunk = f.read(1 << 20)
    except FileNotFoundError:
        return b"", offset
    return chunk, offset + len(chunk)
