"""Runtime: the one owner of sandboxes, used in-process by the SDK and by the daemon alike.

A thin facade over the runtime's parts, which share one :class:`RuntimeContext`:

- :mod:`._sandboxes`: create, start, stop, pause, resume, remove; re-attach after a restart;
- :mod:`._mains`: each sandbox's main command and its output log;
- :mod:`._snapshots`: snapshots and templates, restore, archives (export/import);
- :mod:`._logs`: reading and following logs;
- :mod:`._moves`: the runtime's half of a teleport (capture and hold, give back, arrive,
  let go); :mod:`._facts`: what this host offers.

A sandbox is a VM plus its record in the state database (:mod:`kelpie.runtime._db`). The
record is written before anything starts and is removed only by :meth:`Runtime.remove`, so
a failure at any step leaves a record saying what happened (state and ``last_error``),
never a VM nobody knows about.

VM processes run detached from the runtime: :meth:`Runtime.close` (or the death of the
process) leaves them running. :meth:`Runtime.open` removes what a crash left half done
(unrecorded snapshot and sandbox directories, a snapshot removal cut short) and re-attaches
to every sandbox that was not at rest through its backend's ``attach``; a sandbox whose
backend cannot re-attach, or whose VM is gone, is marked crashed with the reason. A data
directory is owned by one runtime at a time (an advisory lock, released by the kernel when
the process dies).

Everything the runtime depends on is injected: backends (``factory``), the image store,
``storage`` (every directory change: mkdir, rename, remove, the files it writes), ``clock``
(every timestamp) and ``new_id``. The state database and the lock are real files in
``data_dir``. The DST simulator (``python -m kelpie.dst --scenario runtime``) drives this
very code on the mock backend with :class:`kelpie.sim.SimStorage` and a virtual clock,
crashing the host at every storage step of every operation.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from kelpie._signals import signal_number
from kelpie.api import (
    BuildOptions,
    HostFacts,
    ProcessList,
    SandboxCreate,
    SandboxStats,
    TemplateCreate,
)
from kelpie.images import (
    BlobProgress,
    ImageStore,
    PushReport,
    StoredImage,
    pull_image,
    push_image,
)
from kelpie.runtime._arguments import Progress
from kelpie.runtime._build import BuildProgress, Builds
from kelpie.runtime._commit import Commits
from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._crashes import CrashRestarts
from kelpie.runtime._db import DB_FILENAME, StateDb
from kelpie.runtime._events import EventFeed, EventFilter
from kelpie.runtime._expiry import Expiries
from kelpie.runtime._facts import host_facts
from kelpie.runtime._fork import Forks
from kelpie.runtime._info import SandboxEvent, SandboxInfo, SnapshotInfo
from kelpie.runtime._lock import lock_data_dir
from kelpie.runtime._logs import FOLLOW_POLL_SECONDS, Logs
from kelpie.runtime._mains import MainCommands
from kelpie.runtime._moves import Moves
from kelpie.runtime._names import check_name
from kelpie.runtime._network import change_egress
from kelpie.runtime._sandboxes import Sandboxes
from kelpie.runtime._snapshots import Snapshots
from kelpie.runtime._usage import Usage
from kelpie.vm import (
    ExecProcess,
    ExecResult,
    FileInfo,
    LocalStorage,
    SnapshotKind,
    SnapshotManifest,
    Storage,
    VmFactory,
    VmInstance,
)

__all__ = ["Progress", "Runtime"]


def _new_id() -> str:
    return secrets.token_hex(6)


class Runtime:
    """Creates, finds, drives and removes sandboxes; keeps their state in SQLite.

    ``data_dir`` holds the state database and the lock (default: Kelpie's state dir).
    ``factory`` picks backends (default: the built-in ones); ``backend_options`` maps a
    backend name to extra keyword arguments for its ``create`` (e.g. ``{"qemu": {"kit":
    kit}}``). ``images`` is the image store (default: ``<data_dir>/images``). ``clock``
    gives Unix time for the records; ``new_id`` gives fresh lowercase-hex sandbox ids;
    ``storage`` carries every change to the runtime's directories (default: the host file
    system); ``sleep`` waits (the restart policy's back-off).
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
        storage: Storage | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if data_dir is None:
            from kelpie._paths import state_dir

            data_dir = state_dir()
        self.data_dir = Path(data_dir)
        self.factory = VmFactory() if factory is None else factory
        self._ctx = RuntimeContext(
            data_dir=self.data_dir, factory=self.factory, backend_options=backend_options or {},
            images=images, storage=LocalStorage() if storage is None else storage,
            clock=clock, new_id=new_id, sleep=sleep,
        )
        self._lock_file: IO[str] | None = None
        self._mains = MainCommands(self._ctx)
        self._sandboxes = Sandboxes(self._ctx, self._mains)
        self._snapshots = Snapshots(self._ctx, self._sandboxes, self._mains)
        self._logs = Logs(self._ctx)
        self._moves = Moves(self._ctx, self._sandboxes, self._mains)
        self._forks = Forks(self._ctx, self._sandboxes)
        self._crashes = CrashRestarts(self._ctx, self._sandboxes)
        self._commits = Commits(self._ctx)
        self._builds = Builds(self._ctx, self._sandboxes)
        self._ctx.on_crash = self._crashes.crashed
        self._feed = EventFeed(lambda: self._ctx.db, clock)
        self._usage = Usage(self._ctx)
        self._expiries = Expiries(self._ctx, self._sandboxes)

    # ---- lifecycle of the runtime itself ------------------------------------------------
    async def open(self) -> None:
        """Take ownership of the data directory, open the database, settle what a crash
        left, re-attach sandboxes."""
        if self._ctx.open_db is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)  # the lock and database: real files
        self._lock_file = lock_data_dir(self.data_dir)
        try:
            self._ctx.open_db = StateDb(self.data_dir / DB_FILENAME)
            self._ctx.open_db.on_event = self._feed.notify
            self._snapshots.recover()
            await self._sandboxes.recover()
            self._crashes.resume()
            self._expiries.resume()
        except BaseException:
            self._release()
            raise

    async def close(self) -> None:
        """Close the database and give up the data directory.

        Sandboxes are *not* stopped: VMs of backends that survive their runtime keep
        running (their connections are closed), and the next :meth:`open` re-attaches
        (and restarts, as their restart policy says, those whose VMs died meanwhile).
        """
        self._crashes.cancel_all()
        await self._expiries.stop()
        await self._mains.stop_all()
        for vm in list(self._ctx.vms.values()):
            with contextlib.suppress(Exception):
                await vm.detach()
        self._release()

    def _release(self) -> None:
        self._crashes.cancel_all()
        self._expiries.cancel()
        self._mains.cancel_all()
        self._ctx.vms.clear()
        self._ctx.locks.clear()
        if self._ctx.open_db is not None:
            self._ctx.open_db.close()
            self._ctx.open_db = None
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
        return self._ctx.db

    @property
    def images(self) -> ImageStore:
        """The image store sandboxes are created from."""
        return self._ctx.images

    @property
    def storage(self) -> Storage:
        """Where the runtime's directories (sandboxes, snapshots, logs) are changed."""
        return self._ctx.storage

    @property
    def _vms(self) -> dict[str, VmInstance]:
        """The live VM of each sandbox that has one (for tests that reach into a VM)."""
        return self._ctx.vms

    # ---- create -------------------------------------------------------------------------
    async def create(
        self, request: SandboxCreate | None = None, /, *, progress: Progress | None = None,
        **fields: Any,
    ) -> SandboxInfo:
        """Create a sandbox and start it; return its record once it runs.

        With ``template`` the sandbox starts by restoring that template instead of booting;
        its image and VM settings are the template's (only ``name``, ``env`` and
        ``labels`` may be given with it).

        ``image`` is a stored image (tag, digest or id prefix); without one the sandbox
        runs the guest kit's own userland. ``volumes`` are :class:`Mount` objects or
        ``HOST:GUEST[:ro]`` strings; ``ports`` are :class:`PortMapping` objects or
        ``[IP:]HOST:GUEST`` strings (published on 127.0.0.1 unless an IP is given).
        ``command`` is the sandbox's main command, run whenever the sandbox starts, its
        output kept as the sandbox's logs; the sandbox keeps running after it ends. An
        empty ``command`` means the image's default command. ``progress`` receives one
        line per step (image unpacking, disk building, boot).

        The record is written (state ``created``) before the VM starts; if the start
        fails, the record stays (state ``stopped`` or ``crashed``, with ``last_error``)
        and the error is raised.

        ``request`` is the one create request (:class:`kelpie.api.SandboxCreate`, also the
        REST body); in-process callers may give its fields as keywords instead.
        """
        req = SandboxCreate.of(request, fields, "sandbox")
        if req.template is not None:
            info = await self._snapshots.create_from_template(req)
        else:
            info = await self._sandboxes.create(req, progress)
        if req.timeout is not None:
            info = self._expiries.set(info, req.timeout, req.on_timeout)
        return info

    async def set_timeout(self, ref: str, seconds: float | None, *,
                          on_timeout: str | None = None,
                          extend_only: bool = False) -> SandboxInfo:
        """Give the sandbox a timeout ``seconds`` from now, replacing any it had (None: no
        timeout). When it passes, ``on_timeout`` happens to the sandbox: ``remove`` (the
        default), ``pause`` or ``stop`` (None: as set before). A runtime that was closed
        meanwhile acts on the timeouts that passed as soon as it opens. ``extend_only``:
        change it only if that makes it later (a sandbox without one keeps none)."""
        return self._expiries.set(self._ctx.find(ref), seconds, on_timeout,
                                  extend_only=extend_only)

    # ---- the main command ---------------------------------------------------------------
    async def wait_main(self, ref: str) -> int | None:
        """Wait for the sandbox's main command to end; its exit code (None if it has none,
        or it was not started by this runtime and has not been seen to end)."""
        return await self._mains.wait(self._ctx.find(ref).id)

    def output_log(self, sandbox_id: str) -> Path:
        """Where the main command's output of a sandbox is kept."""
        return self._ctx.output_log(sandbox_id)

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
        info = self._ctx.find(ref)
        vm = self._ctx.live_vm(info, "exec in")
        return await vm.exec(argv, env=env, cwd=cwd or info.workdir, stdin=stdin,
                             timeout=timeout, user=user or info.user)

    async def exec_detached(
        self,
        ref: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> str | None:
        """Start a command and leave it running unobserved (its output is dropped), as
        ``docker exec -d``; its exec id (None where the backend gives none)."""
        info = self._ctx.find(ref)
        vm = self._ctx.live_vm(info, "exec in")
        async with vm.exec_stream(argv, env=env, cwd=cwd or info.workdir,
                                  user=user or info.user, keep_running=True,
                                  stdin=b"") as process:
            return process.exec_id

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
        stdin: bytes | None = None,
    ) -> AsyncIterator[ExecProcess]:
        """Start a command and yield its process; leaving the block early kills it.
        ``stdin``: its whole stdin, given up front (see :meth:`VmInstance.exec_stream`)."""
        info = self._ctx.find(ref)
        vm = self._ctx.live_vm(info, "exec in")
        async with vm.exec_stream(argv, env=env, cwd=cwd or info.workdir, timeout=timeout,
                                  user=user or info.user, pty=pty, stdin=stdin) as process:
            yield process

    async def read_file(self, ref: str, path: str) -> bytes:
        """Read a whole file from a running sandbox."""
        return await self._ctx.live_vm(self._ctx.find(ref), "read files in").read_file(path)

    async def read_file_stream(self, ref: str, path: str) -> AsyncIterator[bytes]:
        """Read a file from a running sandbox in chunks."""
        vm = self._ctx.live_vm(self._ctx.find(ref), "read files in")
        async for chunk in vm.read_file_stream(path):
            yield chunk

    async def write_file(
        self, ref: str, path: str, data: bytes | AsyncIterable[bytes], *, mode: int = 0o644,
    ) -> None:
        """Write a file in a running sandbox atomically (from bytes or a stream of chunks)."""
        vm = self._ctx.live_vm(self._ctx.find(ref), "write files in")
        await vm.write_file(path, data, mode=mode)

    async def list_dir(self, ref: str, path: str) -> builtins.list[FileInfo]:
        """List a directory in a running sandbox."""
        return await self._ctx.live_vm(self._ctx.find(ref), "list files in").list_dir(path)

    async def mkdir(self, ref: str, path: str, *, mode: int = 0o755) -> None:
        """Create a directory (and missing parents) in a running sandbox."""
        await self._ctx.live_vm(self._ctx.find(ref), "create directories in").mkdir(path, mode=mode)

    async def remove_path(self, ref: str, path: str, *, recursive: bool = False) -> None:
        """Remove a file (or with ``recursive`` a tree) in a running sandbox."""
        vm = self._ctx.live_vm(self._ctx.find(ref), "remove files in")
        await vm.remove(path, recursive=recursive)

    # ---- lifecycle of sandboxes ---------------------------------------------------------
    async def pause(self, ref: str) -> SandboxInfo:
        """Freeze a running sandbox's vCPUs."""
        return await self._sandboxes.pause(ref)

    async def resume(self, ref: str) -> SandboxInfo:
        """Let a paused sandbox run again."""
        return await self._sandboxes.resume(ref)

    async def stop(self, ref: str, *, timeout: float | None = None) -> SandboxInfo:
        """Shut a sandbox down (a no-op when it is at rest).

        ``timeout=0`` kills the VM at once; otherwise the guest gets ``timeout`` seconds
        (the backend's default when None) to shut down gracefully before it is stopped hard.
        """
        return await self._sandboxes.stop(ref, timeout=timeout)

    async def start(self, ref: str) -> SandboxInfo:
        """Start a sandbox that is stopped or crashed (with a fresh VM if it has none)."""
        return await self._sandboxes.start(ref)

    async def commit(self, ref: str, reference: str, *,
                     message: str | None = None) -> StoredImage:
        """Store a running sandbox's file system changes over its image as a new image
        named ``reference`` (Docker's ``commit``; see :mod:`kelpie.runtime._commit`)."""
        return await self._commits.commit(ref, reference, message=message)

    async def build(self, context: Path | str, options: BuildOptions | None = None, /, *,
                    progress: BuildProgress | None = None, **fields: Any) -> StoredImage:
        """Build the Dockerfile in ``context`` (a directory) into a stored image, every
        ``RUN`` inside a micro-VM (see :mod:`kelpie.runtime._build`). ``options`` (or its
        fields as keywords: ``tag``, ``file``, ``build_arg``, ``target``, ``platform``,
        ``network``, ``no_cache``, ``step_timeout`` ...) say how; ``progress`` receives a
        :class:`kelpie.api.BuildEvent` per step, note and chunk of ``RUN`` output."""
        request = BuildOptions.of(options, fields, "build")
        return await self._builds.build(request, Path(context), progress)

    async def rename(self, ref: str, name: str) -> SandboxInfo:
        """Give a sandbox another name (its id stays)."""
        info = self._ctx.find(ref)
        check_name(name)
        self._ctx.db.set_name(info.id, name, self._ctx.clock())
        return self._ctx.info(info.id)

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """Delete a sandbox: its VM (killed with ``force``), VM directory, image hold, record.

        A sandbox that is running or paused is removed only with ``force``. The record is
        deleted last, so a failure part-way leaves it in place to retry.
        """
        await self._sandboxes.remove(ref, force=force)

    # ---- snapshots and templates --------------------------------------------------------
    @property
    def snapshots_dir(self) -> Path:
        """Where complete snapshots live, one directory per snapshot id."""
        return self._ctx.snapshots_dir

    async def snapshot(
        self, ref: str, *, name: str | None = None, kind: SnapshotKind | str = "full",
        leave_paused: bool = False, template: bool = False, workspace: str | None = None,
    ) -> SnapshotInfo:
        """Snapshot a sandbox: ``full`` (memory + devices + disk; running or paused),
        ``disk`` (a stopped sandbox's disk) or ``checkpoint`` (a running sandbox's
        ``workspace`` directory + env, restorable on any arch; default: the image's working
        directory, else ``/workspace``). The sandbox ends running again (or paused with
        ``leave_paused``). The snapshot is recorded only once complete."""
        return await self._snapshots.take(ref, name=name, kind=kind, leave_paused=leave_paused,
                                          template=template, workspace=workspace)

    async def export_snapshot(self, ref: str, out: IO[bytes], *, compress: bool = False,
                              ) -> None:
        """Write a snapshot as one archive (see :mod:`kelpie.runtime._archive`)."""
        await self._snapshots.export(ref, out, compress=compress)

    async def import_snapshot(self, source: IO[bytes], *, name: str | None = None,
                              ) -> SnapshotInfo:
        """Add a snapshot from an archive; every blob is verified before it is listed."""
        return await self._snapshots.import_(source, name=name)

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
        return await self._snapshots.restore(ref, name=name, paused=paused, template=template,
                                             labels=labels, env=env)

    async def fork(self, ref: str, count: int, *, name_prefix: str | None = None,
                   names: Sequence[str] | None = None,
                   disk_mib: int | None = None) -> list[SandboxInfo]:
        """``count`` children of a running (or paused) sandbox, each a copy of it at this
        moment: named ``names``, else ``PREFIX-1``... (``PREFIX``: ``name_prefix`` or the
        parent's name). The parent pauses only while it is captured; children get their
        own id, host name, RNG reseed and disk, no published ports, and (QEMU) share the
        captured memory copy-on-write. All or none: a child that fails to start removes
        the others. A sandbox with host volumes is refused, naming them. ``disk_mib``: the
        children's root disk, grown (never shrunk) from the parent's while they run."""
        return await self._forks.fork(ref, count, name_prefix=name_prefix, names=names,
                                      disk_mib=disk_mib)

    async def restore_into(self, sandbox: str, snapshot: str, *, paused: bool = False,
                           ) -> SandboxInfo:
        """Roll a sandbox back to one of its own snapshots (same id, name and identity).

        The sandbox must be at rest (stop it first); the snapshot must have been taken
        from it. Everything is verified before the VM starts.
        """
        return await self._snapshots.restore_into(sandbox, snapshot, paused=paused)

    async def create_template(
        self, request: TemplateCreate | None = None, /, *, progress: Progress | None = None,
        **fields: Any,
    ) -> SnapshotInfo:
        """Boot a sandbox once, snapshot it as template ``name``, remove the sandbox.

        Sandboxes created from the template (``create(template=name)``) start by
        restoring it instead of booting.

        ``request`` is the one template request (:class:`kelpie.api.TemplateCreate`, also
        the REST body); in-process callers may give its fields as keywords instead.
        """
        req = TemplateCreate.of(request, fields, "template")
        name = req.name
        self._snapshots.check_free_name(name)
        info = await self.create(image=req.image, cpus=req.cpus, memory_mib=req.memory_mib,
                                 disk_mib=req.disk_mib, env=req.env, network=req.network,
                                 allow=req.allow, deny=req.deny, backend=req.backend,
                                 progress=progress, labels={"kelpie.template-build": name})
        try:
            if progress is not None:
                progress(f"snapshotting {info.name} as template {name}")
            return await self.snapshot(info.id, name=name, template=True)
        finally:
            await self.remove(info.id, force=True)

    # ---- logs ---------------------------------------------------------------------------
    def log_path(self, info: SandboxInfo, *, console: bool = False) -> Path | None:
        """The file :meth:`read_logs` reads: the main command's output, else the VM console."""
        return self._logs.path(info, console=console)

    async def follow_logs(
        self, ref: str, *, tail: int | None = None, console: bool = False,
        poll_seconds: float = FOLLOW_POLL_SECONDS,
    ) -> AsyncIterator[bytes]:
        """Yield the logs (or their last ``tail`` lines), then what is written from then on,
        until the sandbox is at rest or gone."""
        async for chunk in self._logs.follow(self._ctx.find(ref), tail=tail, console=console,
                                             poll_seconds=poll_seconds):
            yield chunk

    # ---- finding (the queries of kelpie.service.SandboxService) --------------------------
    async def inspect(self, ref: str) -> SandboxInfo:
        """The sandbox named ``ref``, with id ``ref``, or whose id starts with ``ref``.

        An id prefix must have at least 3 characters and match one sandbox only.
        """
        return self._ctx.find(ref)

    async def list_sandboxes(self, *, all: bool = False) -> builtins.list[SandboxInfo]:
        """Sandboxes, oldest first: the active ones, or with ``all`` also those at rest."""
        return self._ctx.list(all=all)

    async def set_network(self, ref: str, *, allow: Sequence[str] = (),
                          deny: Sequence[str] = (), network: str | None = None,
                          ) -> SandboxInfo:
        """Replace the sandbox's egress rules (``allow``/``deny``: ``TARGET[:PORT]``, see
        :class:`kelpie.vm.EgressPolicy`) and, between ``nat`` and ``policy``, its network
        mode; a running sandbox obeys them from its next packet."""
        return await change_egress(self._ctx, ref, allow=allow, deny=deny, network=network)

    async def kill(self, ref: str, *, signal: int | str | None = None) -> SandboxInfo:
        """Stop a sandbox at once (its VM is killed); with ``signal`` (a Linux number or
        name: ``TERM``, ``SIGINT``...), send that to its main command instead (Docker's
        ``kill --signal``): the sandbox runs on, its restart policy deciding after the
        command ends."""
        if signal is None:
            return await self.stop(ref, timeout=0)
        signum = signal_number(signal)
        info = self._ctx.find(ref)
        self._ctx.check_not_held(info, "signal")
        await self._mains.signal(info, signum)
        return self._ctx.info(info.id)

    # ---- moving to and from other hosts (kelpie.teleport drives these) -------------------
    async def host_facts(self) -> HostFacts:
        """What this host offers: arch, backends, free resources, images, guest kits."""
        return host_facts(self._ctx)

    @property
    def moves(self) -> Moves:
        """The runtime's half of a teleport (see :mod:`kelpie.runtime._moves`): capture
        and hold a leaving sandbox, give it back or let it go; take an arriving one in."""
        return self._moves

    async def events(self, ref: str) -> builtins.list[SandboxEvent]:
        """The recorded events of a sandbox, oldest first."""
        return self.db.events(self._ctx.find(ref).id)

    def watch_events(
        self, *, since: float | None = None, until: float | None = None,
        sandboxes: Sequence[str] = (), kinds: Sequence[str] = (), states: Sequence[str] = (),
    ) -> AsyncIterator[SandboxEvent]:
        """Every sandbox's events as they are recorded (Docker's ``events``): from
        ``since`` (Unix time; None: from now on), until ``until`` (None: until the caller
        stops), narrowed to the given sandboxes (id, prefix or name), kinds
        (:class:`EventKind` values) and states. Removed sandboxes' events stay in the log
        (the newest 100,000 events are kept)."""
        where = EventFilter.of(sandboxes=sandboxes, kinds=kinds, states=states)
        _ = self.db  # RuntimeNotOpen now rather than at the first iteration
        return self._feed.watch(since=since, until=until, where=where)

    async def stats(self, ref: str) -> SandboxStats:
        """One sample of what the sandbox uses: the host's view of its VM (CPU time,
        resident memory, disk bytes) and the guest's own counters (CPU, memory, root
        disk, network, processes). Counters run from the VM's start: for rates, take two
        samples."""
        return await self._usage.stats(self._ctx.find(ref))

    async def stats_all(self) -> builtins.list[SandboxStats]:
        """A sample of every running or paused sandbox."""
        return await self._usage.stats_all(await self.list_sandboxes())

    async def processes(self, ref: str) -> ProcessList:
        """The processes in the sandbox's guest (Docker's ``top``)."""
        return await self._usage.processes(self._ctx.find(ref))

    async def disk_full(self, ref: str) -> str | None:
        """Why the sandbox's writes fail when its root disk is full, else None."""
        return await self._usage.disk_full(self._ctx.find(ref))

    async def read_logs(self, ref: str, *, tail: int | None = None,
                        console: bool = False) -> bytes:
        """The sandbox's logs (the last ``tail`` lines if given); empty if none yet.

        The logs are the main command's output when the sandbox has one, else (or with
        ``console``) the VM's console (kernel and init messages).
        """
        data, _ = self._logs.read(self._ctx.find(ref), tail, console)
        return data

    async def list_snapshots(self, *, templates: bool | None = None,
                             ) -> builtins.list[SnapshotInfo]:
        """Snapshots, oldest first: all, only templates (True) or only plain ones (False)."""
        return self._snapshots.list(templates=templates)

    async def inspect_snapshot(self, ref: str, *, template: bool | None = None,
                               ) -> SnapshotInfo:
        """The snapshot (or template) with this name, id, or unique id prefix (>= 3);
        ``template`` True or False looks only among templates or plain snapshots."""
        return self._snapshots.get(ref, template=template)

    async def snapshot_compatibility(
        self, ref: str,
    ) -> tuple[SnapshotInfo, SnapshotManifest, builtins.list[str]]:
        """Snapshot ``ref``, what its manifest needs of a host (arch, backend and its
        version, CPU model, machine, guest kit) and every reason it would not restore on
        this one (none: it would)."""
        return self._snapshots.incompatibilities(ref)

    async def delete_snapshot(self, ref: str, *, template: bool = False) -> None:
        """Delete a snapshot or template (``template``: only a template). Its directory goes
        to the trash (atomically), then its record, then the trash; a crash part-way leaves
        either the whole snapshot or none."""
        self._snapshots.remove(ref, template=True if template else None)

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

    async def push_image(self, image: str, reference: str | None = None, *,
                         insecure: bool = False, progress: BlobProgress | None = None,
                         ) -> PushReport:
        """Push a stored image to a registry (see :func:`kelpie.images.push_image`)."""
        return await push_image(self.images, image, reference, insecure=insecure,
                                progress=progress)
