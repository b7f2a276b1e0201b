"""MockVm: a deterministic simulated VM for tests and deterministic simulation.

Its guest is an in-memory file system plus a small shell (see ``_mockshell``). Every
delay runs on the event loop's clock, so under the simulator's virtual clock it takes no
wall time. Faults come from an injected :class:`~kelpie.sim.FaultInjector`, storage from an
injected :class:`~kelpie.vm.Storage`, and host <-> guest round trips from an optional
:class:`~kelpie.sim.SimLink`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from kelpie._version import __version__
from kelpie.backends._mockshell import MockFs, Shell, Stdin
from kelpie.sim import NO_FAULTS, Fault, FaultInjector, SimLink
from kelpie.vm import (
    BackendSpec,
    BootError,
    Capabilities,
    ExecError,
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecProcess,
    ExecRequest,
    FileInfo,
    GuestFileError,
    GuestProcess,
    GuestProcesses,
    GuestUsage,
    HostInfo,
    LocalStorage,
    ProbeResult,
    SnapshotError,
    SnapshotKind,
    SnapshotTooLarge,
    SnapshotWriter,
    Storage,
    StreamName,
    UnsupportedOperation,
    VmConfig,
    VmCrashed,
    VmError,
    VmInstance,
    VmSnapshot,
    capture_checkpoint,
    checkpoint_config,
    is_file_checkpoint,
    read_checkpoint,
    replay_checkpoint,
)

STATE_BLOB = "state.json"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SIGKILL = 9


class MockProcess(ExecProcess):
    """A command running in the mock guest."""

    def __init__(self, request: ExecRequest, vm: MockVm) -> None:
        super().__init__(request)
        self._vm = vm
        self._stdin = Stdin()
        self._events_q: asyncio.Queue[ExecEvent | BaseException] = asyncio.Queue()
        self._signal: int | None = None
        self._aborted = False
        self.started = asyncio.get_running_loop().time()
        """When it started (the event loop's clock)."""
        self._task = asyncio.create_task(self._run(), name=f"mock-exec-{request.argv[0]}")
        self._task.add_done_callback(self._finished)
        vm._processes.add(self)

    async def _run(self) -> tuple[int, bool]:
        """Run the command; returns (exit code, timed out). A signal cancels this task."""
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", **self.request.env}
        shell = Shell(
            self._vm.fs,
            env=env,
            cwd=self.request.cwd or "/",
            hostname=self._vm.hostname,
            stdin=self._stdin,
            write=self._write,
            sleep=self._vm._guest_sleep,
        )
        try:
            async with asyncio.timeout(self.request.timeout):
                if self._vm._faults.check(Fault.EXEC_TIMEOUT, "exec"):
                    await asyncio.Event().wait()  # hangs until the timeout (or a kill) ends it
                if self.request.cwd is not None and not self._vm.fs.is_dir(self.request.cwd):
                    message = f"cwd {self.request.cwd}: no such directory\n"
                    await self._write("stderr", message.encode())
                    code = 126
                else:
                    code = await shell.run(list(self.request.argv))
        except TimeoutError:
            self._signal = SIGKILL
            return 128 + SIGKILL, True
        return code, False

    def _finished(self, task: asyncio.Task[tuple[int, bool]]) -> None:
        # A done-callback, not code in _run: a signal may cancel the task before it started.
        self._vm._processes.discard(self)
        if self._aborted:
            return
        if task.cancelled():
            code, timed_out = 128 + (self._signal or SIGKILL), False
        else:
            code, timed_out = task.result()
        duration = asyncio.get_running_loop().time() - self.started
        self._events_q.put_nowait(ExecExit(code, duration, self._signal, timed_out))

    async def _write(self, stream: str, data: bytes) -> None:
        await self._vm._running.wait()  # a paused guest makes no progress
        if data:
            self._events_q.put_nowait(ExecOutput(StreamName(stream), data))

    def abort(self, error: BaseException) -> None:
        """End the stream with ``error`` (the VM stopped or crashed under it)."""
        self._aborted = True
        self._task.cancel()
        self._events_q.put_nowait(error)

    async def write_stdin(self, data: bytes) -> None:
        self._stdin.feed(bytes(data))

    async def close_stdin(self) -> None:
        self._stdin.feed(None)

    async def send_signal(self, signum: int) -> None:
        if self._signal is None and not self._task.done():
            self._signal = signum
            self._task.cancel()

    async def _events(self) -> AsyncIterator[ExecEvent]:
        while True:
            event = await self._events_q.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, ExecExit):
                return


class MockVm(VmInstance):
    """A simulated VM: deterministic, instant (or on virtual time), with injectable faults."""

    backend_name = "mock"
    capabilities = Capabilities(
        pause=True,
        snapshot_kinds=frozenset(SnapshotKind),
        emulation=True,  # any guest architecture, as a simulation
        grow_disk=True,
    )

    def __init__(
        self,
        config: VmConfig,
        *,
        vm_id: str | None = None,
        faults: FaultInjector = NO_FAULTS,
        storage: Storage | None = None,
        link: SimLink | None = None,
        wall_clock: Callable[[], float] = time.time,
        boot_seconds: float = 0.0,
        max_snapshot_bytes: int | None = None,
        file_checkpoints: bool = False,
    ) -> None:
        super().__init__(config, vm_id=vm_id)
        self._faults = faults
        self._storage = storage or LocalStorage()
        self._link = link
        self._wall_clock = wall_clock
        self._boot_seconds = boot_seconds
        self.max_snapshot_bytes = max_snapshot_bytes
        self.file_checkpoints = file_checkpoints
        """Take checkpoints through the file hooks, in the format every backend restores
        (``kelpie.vm._checkpoint``), instead of the mock's native dump of its whole file
        system. Either format restores into a mock."""
        self.fs = MockFs()
        self.hostname = config.hostname or f"kelpie-{self.id[:8]}"
        self.boots = 0
        self.stop_grace: float | None = None
        self._booted_at = 0.0
        self.exec_count = 0
        self._running = asyncio.Event()
        self._processes: set[MockProcess] = set()

    # ---- state digests, for tests and simulation invariants ------------------------------
    def guest_state(self, kind: SnapshotKind = SnapshotKind.FULL) -> dict[str, Any]:
        """The guest state a snapshot of ``kind`` captures, as canonical JSON-ready data."""
        state: dict[str, Any] = {"fs": self.fs.to_state()}
        if kind is SnapshotKind.FULL:
            state.update(hostname=self.hostname, boots=self.boots, exec_count=self.exec_count)
        return state

    def state_digest(self, kind: SnapshotKind = SnapshotKind.FULL) -> str:
        """sha256 of :meth:`guest_state`: equal digests mean byte-identical guests."""
        return hashlib.sha256(_canonical(self.guest_state(kind))).hexdigest()

    def _load_state(self, state: dict[str, Any], kind: SnapshotKind) -> None:
        self.fs = MockFs.from_state(state["fs"])
        if kind is SnapshotKind.FULL:
            self.hostname = str(state["hostname"])
            self.boots = int(state["boots"])
            self.exec_count = int(state["exec_count"])

    # ---- helpers ------------------------------------------------------------------------
    def crash(self, reason: str) -> None:
        """Die now, as a VM whose process was killed: its commands end with VmCrashed."""
        self._halt(VmCrashed(f"VM {self.id} crashed: {reason}"))
        self.mark_crashed(reason)

    def _maybe_crash(self, operation: str) -> None:
        if self._faults.check(Fault.CRASH, operation):
            self._halt(VmCrashed(f"VM {self.id} crashed during {operation} (injected)"))
            raise VmCrashed(f"VM {self.id} crashed during {operation} (injected)")

    def _halt(self, error: BaseException) -> None:
        self._running.clear()
        for process in list(self._processes):
            process.abort(error)
        self._processes.clear()

    async def _round_trip(self, operation: str) -> None:
        if self._link is not None:
            await self._link.round_trip(operation)

    async def _guest_sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._running.wait()

    def host_info(self) -> HostInfo:
        return HostInfo(
            arch=self.config.arch or HostInfo.current_arch(),
            backend=self.backend_name,
            backend_version=__version__,
            cpu_model="mock",
            machine="mock",
        )

    # ---- lifecycle hooks ----------------------------------------------------------------
    async def _boot(self, operation: str) -> None:
        self._booted_at = asyncio.get_running_loop().time()
        if self._boot_seconds:
            await asyncio.sleep(self._boot_seconds)
        if self._faults.check(Fault.BOOT_FAIL, operation):
            raise BootError(f"VM {self.id} failed to boot (injected boot_fail)")
        self._maybe_crash(operation)
        self._running.set()

    async def _do_start(self) -> None:
        await self._boot("start")
        self.boots += 1

    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        self.stop_grace = grace  # what the caller allowed for a graceful stop (tests read it)
        self._halt(VmError(f"VM {self.id} stopped while the command was running"))

    async def _do_pause(self) -> None:
        self._maybe_crash("pause")
        if self._faults.check(Fault.PAUSE_FAIL, "pause"):
            raise VmError(f"VM {self.id}: pause failed (injected); the VM is still running")
        self._running.clear()

    async def _do_resume(self) -> None:
        self._maybe_crash("resume")
        if self._faults.check(Fault.RESUME_FAIL, "resume"):
            raise VmError(f"VM {self.id}: resume failed (injected); the VM is still paused")
        self._running.set()

    # ---- exec and files -----------------------------------------------------------------
    async def _do_exec(self, request: ExecRequest) -> ExecProcess:
        await self._round_trip("exec")
        self._maybe_crash("exec")
        if self._faults.check(Fault.EXEC_FAIL, "exec"):
            raise ExecError(f"could not start {request.argv[0]!r} (injected exec_fail)")
        self.exec_count += 1
        return MockProcess(request, self)

    async def _do_read_file(self, path: str) -> AsyncIterator[bytes]:
        await self._round_trip("read_file")
        self._maybe_crash("read_file")
        data = self.fs.read(MockFs.resolve("/", path))
        for i in range(0, max(len(data), 1), 64 * 1024):
            yield data[i : i + 64 * 1024]

    async def _do_write_file(self, path: str, chunks: AsyncIterable[bytes], mode: int) -> None:
        await self._round_trip("write_file")
        self._maybe_crash("write_file")
        data = b"".join([bytes(c) async for c in chunks])
        self.fs.write(MockFs.resolve("/", path), data, mode)

    # ---- usage: what the mock keeps (its files live in memory, as on a tmpfs) ------------
    def _uptime(self) -> float:
        return asyncio.get_running_loop().time() - self._booted_at

    async def _do_guest_usage(self) -> GuestUsage:
        await self._round_trip("usage")
        stored = sum(len(data) for data, _ in self.fs.files.values())
        total = self._config.memory_mib << 20
        disk = (self._config.disk_mib or self._config.memory_mib) << 20
        return GuestUsage(cpu_seconds=0.0, cpus=self._config.vcpus, memory_total=total,
                          memory_used=min(stored, total), disk_total=disk,
                          disk_used=min(stored, disk), disk_available=max(0, disk - stored),
                          net_rx=0, net_tx=0, processes=1 + len(self._processes),
                          uptime=self._uptime())

    async def _do_grow_disk(self, disk_mib: int) -> None:
        await self._round_trip("grow_disk")
        self._maybe_crash("grow_disk")

    async def _do_guest_processes(self) -> GuestProcesses:
        await self._round_trip("processes")
        init = GuestProcess(1, 0, 0, "S", 0.0, 0, 0.0, ("/sbin/init",))
        running = [GuestProcess(2 + n, 1, 0, "S", 0.0, 0, p.started - self._booted_at,
                                p.request.argv)
                   for n, p in enumerate(sorted(self._processes, key=lambda p: p.started))]
        return GuestProcesses((init, *running), self._uptime())

    async def _do_list_dir(self, path: str) -> list[FileInfo]:
        await self._round_trip("list_dir")
        target = MockFs.resolve("/", path)
        if not self.fs.is_dir(target):
            raise GuestFileError(path, "ENOTDIR" if target in self.fs.files else "ENOENT",
                                 "not a directory")
        infos = []
        for name in self.fs.list(target):
            full = MockFs.resolve(target, name)
            if self.fs.is_dir(full):
                infos.append(FileInfo(name, "dir", 0, self.fs.dirs[full]))
            else:
                data, mode = self.fs.files[full]
                infos.append(FileInfo(name, "file", len(data), mode))
        return infos

    async def _do_remove(self, path: str, recursive: bool) -> None:
        await self._round_trip("remove")
        self.fs.remove(MockFs.resolve("/", path), recursive=recursive)

    async def _do_mkdir(self, path: str, mode: int) -> None:
        await self._round_trip("mkdir")
        self.fs.mkdir(MockFs.resolve("/", path), parents=True, mode=mode & 0o7777)

    async def _do_readlink(self, path: str) -> str:
        raise GuestFileError(path, "EINVAL", "not a symbolic link (the mock guest has none)")

    async def _do_symlink(self, target: str, path: str) -> None:
        raise UnsupportedOperation(self.backend_name, f"symbolic links ({path} -> {target})")

    async def _do_agent_state(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "commands": [list(p.request.argv) for p in self._processes],
        }

    # ---- snapshots ----------------------------------------------------------------------
    async def _do_snapshot(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        self._maybe_crash("snapshot")
        if self._faults.check(Fault.SNAPSHOT_CREATE_FAIL, "snapshot"):
            raise SnapshotError(f"VM {self.id}: snapshot failed (injected)")
        if kind is SnapshotKind.CHECKPOINT and self.file_checkpoints:
            created = dt.datetime.fromtimestamp(self._wall_clock(), dt.UTC)
            return await capture_checkpoint(
                self, dest, storage=self._storage, max_bytes=self.max_snapshot_bytes,
                created_at=created.replace(microsecond=0).isoformat(),
            )
        blob = _canonical(self.guest_state(kind))
        if self._faults.check(Fault.SNAPSHOT_TOO_LARGE, "snapshot"):
            raise SnapshotTooLarge(len(blob), len(blob) - 1)
        host = self.host_info()
        with SnapshotWriter(dest, storage=self._storage, max_bytes=self.max_snapshot_bytes) as w:
            w.add_blob(STATE_BLOB, blob)
            created = dt.datetime.fromtimestamp(self._wall_clock(), dt.UTC)
            return w.commit(
                kind=kind,
                backend=host.backend,
                backend_version=host.backend_version,
                arch=host.arch,
                cpu_model=host.cpu_model,
                machine=host.machine,
                vcpus=self.config.vcpus,
                memory_mib=self.config.memory_mib,
                vm_id=self.id,
                created_at=created.replace(microsecond=0).isoformat(),
                extra={"state_sha256": hashlib.sha256(blob).hexdigest()},
            )

    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        if is_file_checkpoint(snapshot.manifest):
            await self._restore_file_checkpoint(snapshot, paused=paused)
            return
        kind = snapshot.manifest.kind
        state = json.loads(snapshot.read_blob(STATE_BLOB))
        if self._faults.check(Fault.RESTORE_FAIL, "restore"):
            raise BootError(f"VM {self.id}: restore failed (injected)")
        await self._boot("restore")
        self._load_state(state, kind)  # only once booted: a failed restore changes nothing
        if kind is not SnapshotKind.FULL:
            self.boots += 1
        if paused:
            self._running.clear()

    async def _restore_file_checkpoint(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Boot a fresh guest, then write the checkpoint's workspace into it (any backend's)."""
        content = read_checkpoint(snapshot, self)  # checked whole before the guest changes
        if self._faults.check(Fault.RESTORE_FAIL, "restore"):
            raise BootError(f"VM {self.id}: restore failed (injected)")
        await self._boot("restore")
        old_fs, old_config = self.fs, self._config
        self.fs = MockFs()
        self._config = checkpoint_config(self._config, content)
        try:
            await replay_checkpoint(self, content)
        except BaseException:
            self.fs, self._config = old_fs, old_config  # a failed restore changes nothing
            raise
        self.boots += 1
        if paused:
            self._running.clear()

    @property
    def running_processes(self) -> int:
        """How many commands are running in the guest."""
        return len(self._processes)


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _create(config: VmConfig, **options: Any) -> VmInstance:
    return MockVm(config, **options)


def _probe() -> ProbeResult:
    return ProbeResult(True, "always available (simulated, in-process)")


SPEC = BackendSpec(
    name="mock",
    description="deterministic simulated VM for tests and simulation",
    capabilities=MockVm.capabilities,
    probe=_probe,
    create=_create,
    priority=0,
    real=False,
)
