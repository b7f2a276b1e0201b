"""QemuVm: a real micro-VM under QEMU (``microvm`` machine, KVM when proven, else TCG).

Each VM owns one directory (see DESIGN.md): ``qmp.sock``, ``agent.sock`` (QEMU's end of the
virtio-serial agent port), ``console.log``, ``qemu.log`` (QEMU's own stderr), ``qemu.pid``,
``config.json`` (the config, and the accelerator, host name and guest kit it booted with)
and, with a root disk, ``overlay.qcow2`` on top of the read-only base; after a restore
that left the guest paused, ``pending-resync.json`` until it first runs again; while a full
snapshot is taken, ``snapshot-in-progress.json``.
QEMU runs in its own session, so it does not die with the process that started it, and
:meth:`QemuVm.attach` finds it again from that directory (after a daemon restart, say).

Full snapshots save the device state and RAM with QMP migration to a file and copy the
overlay; restores start QEMU with ``-incoming defer`` and load it (see ``_migration`` and
``_snapshot``). Disk snapshots are the overlay of a stopped VM, restored by booting.

A full snapshot pauses the guest, so the process taking it must not die half-way unnoticed:
before it pauses, it writes ``snapshot-in-progress.json`` (whether the guest ran, whether to
resume it, the snapshot's partial directory), removed once the guest is back as it should
be. :meth:`QemuVm.attach` finding that marker (the process died mid-snapshot: a daemon
SIGKILLed, say) cancels the migration QEMU may still be writing, waits until QEMU has left
it, resumes the guest if the snapshot would have, and removes the partial snapshot and the
marker: the snapshot was never published, and the VM is as before it.

QEMU's exit is learnt through a pidfd (:class:`ProcessWatch`), the same way whether this
process started it or only attached to it: an attached QEMU is not our child, so waiting
for a child cannot see it die.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import time
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from kelpie._paths import vms_dir
from kelpie.backends import _agent_client as agent
from kelpie.backends.qemu import CAPABILITIES, _migration, _snapshot
from kelpie.backends.qemu._accel import AccelChoice, choose_accel
from kelpie.backends.qemu._cmdline import QemuLaunch, build_command, device_signature
from kelpie.backends.qemu._snapshot import DISK_BLOB, MEMORY_BLOB, SnapshotRecord
from kelpie.guestkit import GuestKit, GuestKitError, build_guestkit
from kelpie.vm import (
    AgentError,
    BootError,
    ConfigError,
    ExecError,
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecProcess,
    ExecRequest,
    FileInfo,
    GuestFileError,
    HostInfo,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotKind,
    SnapshotWriter,
    StorageError,
    StreamName,
    VmConfig,
    VmCrashed,
    VmError,
    VmInstance,
    VmSnapshot,
    VmState,
)
from kelpie.vm._checkpoint import (
    capture_checkpoint,
    checkpoint_config,
    read_checkpoint,
    replay_checkpoint,
)
from kelpie.vm._snapshot import PARTIAL_SUFFIX

T = TypeVar("T")
_log = logging.getLogger(__name__)

DEFAULT_BOOT_TIMEOUT = 120.0
BOOT_ATTEMPTS = 2
"""A start whose guest never answers within the boot timeout is tried once more."""
"""Seconds from QEMU start to the agent's hello; generous because TCG on a loaded host is slow."""
SHUTDOWN_TIMEOUT = 5.0
QUIT_TIMEOUT = 3.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes including the NUL; keep a margin
CONSOLE_TAIL = 2000
ATTACH_TIMEOUT = 30.0
"""Seconds for re-attaching: QMP greeting, query-status and the agent's hello."""
RESTORE_ENTROPY_BYTES = 64
"""Fresh host randomness a restored guest mixes into its kernel RNG (then reseeds)."""
PENDING_RESYNC = "pending-resync.json"
"""In a VM directory: a restore left the guest paused; resync it when it resumes."""
SNAPSHOT_MARKER = "snapshot-in-progress.json"
"""In a VM directory: a full snapshot is (or was, if its process died) being taken."""
VM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
QMP_RUNNING = "running"
QMP_DEAD = frozenset({"guest-panicked", "internal-error", "shutdown"})
"""QMP run states of a guest that will not run again; any other non-running one is paused."""
_HOSTFWD_FAILED = re.compile(
    r"could not set up host forwarding rule '(tcp|udp)?:([^:']*):([0-9]+)-[^']*'", re.IGNORECASE
)


def console_tail(workdir: Path, limit: int = CONSOLE_TAIL) -> str:
    """The last ``limit`` characters of the guest console and QEMU's own log."""
    parts = []
    for name in ("console.log", "qemu.log"):
        with contextlib.suppress(OSError):
            text = (workdir / name).read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {name} ---\n{text[-limit:]}")
    return "\n".join(parts) or "(no console output)"


def start_failure_reason(workdir: Path) -> str | None:
    """Why QEMU refused to start, in plain words, when its log says so clearly; else None.

    A published port whose host port cannot be bound makes QEMU print
    ``Could not set up host forwarding rule 'tcp:127.0.0.1:8080-10.0.2.15:80'`` and exit.
    """
    try:
        log = (workdir / "qemu.log").read_text(errors="replace")
    except OSError:
        return None
    ports = [
        f"{address or '0.0.0.0'}:{number}/{protocol or 'tcp'}"
        for protocol, address, number in _HOSTFWD_FAILED.findall(log)
    ]
    if not ports:
        return None
    return (
        f"cannot publish host port {', '.join(ports)}: QEMU could not bind it (already in "
        f"use? not an address of this host? below 1024 without the privilege to bind it?)"
    )


class _BootTimedOut(BootError):
    """A boot (or attach) step did not finish in time while QEMU kept running."""


class ProcessWatch:
    """Learns when one process exits, through a pidfd, whether or not it is our child.

    ``exited`` resolves to the exit status (``-N`` when signal N killed it) when the process
    is our child; to None when another process started it, since only the parent can
    collect the status. The pidfd also makes signals race-free: it names this process
    only, even after its pid is reused.
    """

    def __init__(self, pid: int, *, child: bool) -> None:
        self.pid = pid
        self.child = child
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int | None] = self._loop.create_future()
        self._fd: int | None = os.pidfd_open(pid)  # ProcessLookupError once it is reaped
        try:
            self._loop.add_reader(self._fd, self._on_exit)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet (as far as the event loop has seen)."""
        return not self.exited.done()

    def has_exited(self) -> bool:
        """Ask the pidfd now, without waiting for the event loop to deliver its event."""
        if self._fd is None:
            return True
        readable, _, _ = select.select([self._fd], [], [], 0)
        return bool(readable)

    async def wait(self) -> int | None:
        """Wait for the exit; cancelling the caller does not stop the watch."""
        return await asyncio.shield(self.exited)

    def kill_group(self) -> None:
        """SIGKILL the process's group (QEMU leads its own session) and the process itself."""
        if self._fd is None or self.has_exited():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    def close(self) -> None:
        """Stop watching; ``exited`` is cancelled if the process still ran."""
        self._release()
        self.exited.cancel()

    def _on_exit(self) -> None:
        self._release()
        if not self.exited.done():
            self.exited.set_result(self._reap())

    def _release(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _reap(self) -> int | None:
        if not self.child:
            return None
        try:
            _, status = os.waitpid(self.pid, 0)  # returns at once: the pidfd says it exited
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status)


def spawn_in_new_session(command: list[str], log: Path) -> int:
    """Start ``command`` in its own session, output appended to ``log``; return its pid.

    ``posix_spawn`` rather than an asyncio subprocess: asyncio kills a child whose transport
    is garbage-collected, and a VM must outlive the objects (and the process) that started it.
    """
    with log.open("ab") as out:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
        ]
        return os.posix_spawnp(
            command[0], command, dict(os.environ), file_actions=actions, setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores them; QEMU must not
        )


def qmp_socket_of(pid: int) -> Path | None:
    """The QMP socket named on process ``pid``'s command line (``-qmp unix:PATH,...``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    for option, value in itertools.pairwise(argv):
        found = re.match(rb"unix:((?:[^,]|,,)+)", value) if option == b"-qmp" else None
        if found:
            return cwd / os.fsdecode(found.group(1).replace(b",,", b","))
    return None


def is_qemu_of(pid: int, qmp_socket: Path) -> bool:
    """Whether ``pid`` is the QEMU serving ``qmp_socket`` (a pid file can outlive its pid)."""
    named = qmp_socket_of(pid)
    return named is not None and os.path.realpath(named) == os.path.realpath(qmp_socket)


def read_vm_record(directory: Path, vm_id: str) -> VmConfig:
    """The configuration saved in a VM directory's ``config.json`` by :meth:`QemuVm.start`."""
    record_file = directory / "config.json"
    try:
        record = json.loads(record_file.read_text())
    except FileNotFoundError:
        raise VmError(
            f"no Kelpie VM {vm_id!r} in {directory}: there is no config.json (it is written "
            f"when a VM starts); check the id and KELPIE_STATE_DIR"
        ) from None
    except (OSError, ValueError) as exc:
        raise VmError(f"{record_file} is not a Kelpie VM record: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise VmError(f"{record_file} is not a Kelpie VM record: no \"config\" object")
    if record.get("id") != vm_id or record.get("backend") != QemuVm.backend_name:
        raise VmError(
            f"{record_file} describes {record.get('backend')!r} VM {record.get('id')!r}, "
            f"expected {QemuVm.backend_name!r} VM {vm_id!r}"
        )
    try:
        return VmConfig.from_dict(record["config"])
    except (ConfigError, TypeError) as exc:
        raise VmError(f"{record_file} holds an invalid VM configuration: {exc}") from exc


def state_for_qmp_status(status: str) -> VmState:
    """The VmState of a guest whose QMP ``query-status`` is ``status``."""
    if status == QMP_RUNNING:
        return VmState.RUNNING
    if status in QMP_DEAD:
        return VmState.CRASHED
    return VmState.PAUSED  # paused, prelaunch, inmigrate, suspended...: vCPUs are stopped


class _QemuGone(Exception):
    """Internal: the VM directory names no live QEMU of this VM (the message says why)."""


@dataclasses.dataclass
class _SnapshotPlan:
    """The full snapshot this task is taking (see :data:`_SNAPSHOT_PLAN`)."""

    vm: QemuVm
    dest: Path
    leave_paused: bool
    marked: bool = False
    """Whether this snapshot has written its marker (and must remove it)."""


_SNAPSHOT_PLAN: contextvars.ContextVar[_SnapshotPlan | None] = contextvars.ContextVar(
    "kelpie_qemu_snapshot_plan", default=None
)
"""Set by :meth:`QemuVm.snapshot` for the hooks the base class calls under its lock
(``_do_pause``, ``_do_snapshot``): per task, so a ``pause()`` elsewhere is not mistaken
for a snapshot's."""


def partial_dir_of(dest: Path) -> Path:
    """Where :class:`SnapshotWriter` writes the snapshot ``dest`` until it is complete."""
    return dest.parent / f".{dest.name}{PARTIAL_SUFFIX}"


class QemuProcess(ExecProcess):
    """A command running in a QEMU guest, driven through the agent."""

    def __init__(self, request: ExecRequest, handle: agent.ExecHandle, vm: QemuVm) -> None:
        super().__init__(request)
        self._handle = handle
        self._vm = vm
        self._started = time.monotonic()
        self._interrupted: str | None = None

    def interrupt(self, reason: str) -> None:
        """End this command's stream with ``reason`` (its VM was restored under it)."""
        self._interrupted = reason

    @contextlib.contextmanager
    def _errors(self, *, request: bool = True) -> Iterator[None]:
        """Kelpie errors for agent failures; an interrupted command says why it ended.

        An interrupted command sends no more ``request``: its connection is gone, and its
        request id may name another command of the restored VM's new session.
        """
        if request and self._interrupted is not None:
            raise ExecError(self._interrupted)
        try:
            with self._vm._agent_errors():
                yield
        except VmError as exc:
            if self._interrupted is not None:
                raise ExecError(self._interrupted) from exc
            raise

    async def write_stdin(self, data: bytes) -> None:
        with self._errors():
            await self._handle.write_stdin(data)

    async def close_stdin(self) -> None:
        with self._errors():
            await self._handle.close_stdin()

    async def send_signal(self, signum: int) -> None:
        with self._errors():
            await self._handle.send_signal(signum, group=True)

    async def resize(self, rows: int, cols: int) -> None:
        with self._errors():
            await self._handle.resize(rows, cols)

    async def _events(self) -> AsyncIterator[ExecEvent]:
        with self._errors(request=False):  # output received before the stop comes first
            async for kind, payload in self._handle:
                if kind == "exit":
                    assert isinstance(payload, agent.ExecResult)
                    sig = payload.signal
                    code = payload.exit_code if payload.exit_code is not None else 128 + (sig or 0)
                    duration = time.monotonic() - self._started
                    yield ExecExit(code, duration, sig, payload.timed_out)
                    return
                assert isinstance(payload, bytes)
                yield ExecOutput(StreamName(kind), payload)


class _FinishedProcess(ExecProcess):
    """A command that could not start (e.g. not found): reported like a shell would."""

    def __init__(self, request: ExecRequest, code: int, message: str) -> None:
        super().__init__(request)
        self._code = code
        self._message = message

    async def write_stdin(self, data: bytes) -> None:
        return None

    async def close_stdin(self) -> None:
        return None

    async def send_signal(self, signum: int) -> None:
        return None

    async def _events(self) -> AsyncIterator[ExecEvent]:
        yield ExecOutput(StreamName.STDERR, self._message.encode() + b"\n")
        yield ExecExit(self._code, 0.0)


class QemuVm(VmInstance):
    """A micro-VM run by QEMU; commands and files go through the guest agent."""

    backend_name = "qemu"
    capabilities = CAPABILITIES

    def __init__(
        self,
        config: VmConfig,
        *,
        vm_id: str | None = None,
        workdir: Path | None = None,
        kit: GuestKit | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        qemu: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, vm_id=vm_id)
        self.workdir = workdir or vms_dir() / self.id
        if len(str(self.workdir / "agent.sock")) > MAX_SOCKET_PATH:
            raise ConfigError([
                f"VM directory {self.workdir} is too long for unix sockets "
                f"(at most {MAX_SOCKET_PATH - 11} characters); set KELPIE_STATE_DIR shorter"
            ])
        self._kit = kit
        self.boot_timeout = boot_timeout
        self._qemu = qemu
        self._progress = progress or logging.getLogger("kelpie.guestkit").info
        self.accel: AccelChoice | None = None
        self._process: ProcessWatch | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._qmp: QMPClient | None = None
        self._agent: agent.AgentClient | None = None
        self.agent_info: agent.AgentInfo | None = None
        self.exit_status: int | None = None
        self._stopping = False
        self._kit_digest: str | None = kit.digest if kit is not None else None
        """The guest kit this VM booted (known after start, or from its record on attach)."""
        self._processes: weakref.WeakSet[QemuProcess] = weakref.WeakSet()
        self.snapshot_bandwidth = _migration.UNLIMITED_BANDWIDTH
        """Bytes per second QEMU may write a full snapshot at (lower it to watch one)."""
        self.recovered_snapshot: str | None = None
        """Set by :meth:`attach` when it undid a full snapshot whose process had died:
        where that snapshot was going (it was never published)."""

    # ---- paths --------------------------------------------------------------------------
    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.running else None

    def _qemu_running(self) -> bool:
        return self._process is not None and self._process.running

    def host_info(self) -> HostInfo:
        return HostInfo(
            arch=HostInfo.current_arch(),
            backend=self.backend_name,
            backend_version=_qemu_version(self._qemu_binary()),
            cpu_model=_cpu_model(self.accel.accel if self.accel else "tcg"),
            machine="microvm",
            guestkit_digest=self._kit_digest,
        )

    def _qemu_binary(self) -> str:
        found = self._qemu or shutil.which("qemu-system-x86_64")
        if found is None:
            raise BootError(
                "qemu-system-x86_64 not found; install it (Debian: apt-get install "
                "qemu-system-x86)"
            )
        return found

    # ---- start --------------------------------------------------------------------------
    async def _do_start(self) -> None:
        launch = await self._prepare_launch(self.config)
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            self._prepare_workdir(launch)
            booting = dataclasses.replace(launch, overlay=await self._prepare_overlay())
            try:
                await self._boot(booting)
                return
            except _BootTimedOut as exc:
                if attempt == BOOT_ATTEMPTS:
                    raise
                # A guest that never reaches its agent (seen rarely under TCG on a loaded
                # host: the kernel stalls early in boot) gets a second boot; a QEMU that
                # exits or refuses its arguments does not.
                _log.warning("%s\n(booting it again)", exc)
                await self._do_stop(force=True)

    async def _prepare_launch(self, config: VmConfig, *, incoming: bool = False) -> QemuLaunch:
        """Check ``config`` on this host, get the guest kit and accelerator: no VM yet."""
        problems = config.host_problems()
        if problems:
            raise ConfigError(problems)
        qemu = self._qemu_binary()
        if self._kit is None:
            try:
                self._kit = await asyncio.to_thread(build_guestkit, progress=self._progress)
            except GuestKitError as exc:
                raise BootError(f"cannot prepare the guest kit: {exc}") from exc
        kit = self._kit
        kernel = config.kernel or kit.kernel
        initrd = config.initrd or kit.initrd
        self.accel = await asyncio.to_thread(choose_accel, qemu, kernel, initrd, kit.digest)
        # The agent comes from the kit's initrd; a VM booted from another initrd has no
        # kit whose version a restore could check.
        self._kit_digest = kit.digest if config.initrd is None else None
        return QemuLaunch(
            qemu=qemu, config=config, kernel=kernel, initrd=initrd, workdir=self.workdir,
            accel=self.accel.accel, hostname=config.hostname or f"kelpie-{self.id[:8]}",
            incoming=incoming,
        )

    async def _boot(self, launch: QemuLaunch) -> None:
        """Start QEMU and wait for the guest agent's hello."""
        await self._spawn(build_command(launch))
        deadline = time.monotonic() + self.boot_timeout
        self._qmp = await self._before_exit(self._connect_qmp(), "the QMP socket", deadline)
        self._agent = await self._before_exit(
            agent.AgentClient.connect_unix(str(self.agent_socket), timeout=self.boot_timeout),
            "the agent socket", deadline,
        )
        self.agent_info = await self._before_exit(
            self._agent.hello(), "the guest agent's hello", deadline
        )

    def _prepare_workdir(self, launch: QemuLaunch) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("qmp.sock", "agent.sock", "console.log", "qemu.log", "qemu.pid",
                     PENDING_RESYNC, SNAPSHOT_MARKER):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()
        self._write_record(launch)

    def _write_record(self, launch: QemuLaunch) -> None:
        """``config.json``: the VM's config and how it was launched (for attach, snapshots)."""
        record = {
            "id": self.id, "backend": self.backend_name, "config": launch.config.to_dict(),
            "launch": {
                "accel": launch.accel, "hostname": launch.hostname,
                "guestkit_digest": self._kit_digest,
            },
        }
        (self.workdir / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    def _launch_record(self) -> dict[str, Any]:
        """The ``launch`` part of ``config.json`` (empty when absent or unreadable)."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            launch = json.loads((self.workdir / "config.json").read_text()).get("launch")
            if isinstance(launch, dict):
                return launch
        return {}

    async def _prepare_overlay(self) -> Path | None:
        base = self.config.root_disk
        if base is None:
            return None
        if not base.is_file():
            raise BootError(f"root disk {base} does not exist or is not a file")
        overlay = self.workdir / "overlay.qcow2"
        if overlay.exists():
            return overlay  # the disk persists across stop/start, like a real disk
        fmt = _snapshot.image_format(base)
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base.resolve()),
            str(overlay), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        if process.returncode != 0:
            raise BootError(f"cannot create the disk overlay: {err.decode().strip()}")
        return overlay

    async def _spawn(self, command: list[str]) -> None:
        try:
            pid = spawn_in_new_session(command, self.workdir / "qemu.log")
        except OSError as exc:
            raise BootError(f"VM {self.id}: cannot run {command[0]}: {exc}") from exc
        (self.workdir / "qemu.pid").write_text(f"{pid}\n")
        self._track(ProcessWatch(pid, child=True))

    def _track(self, process: ProcessWatch) -> None:
        """Watch QEMU from now on: its exit while RUNNING or PAUSED marks the VM CRASHED."""
        self._process = process
        self._watcher = asyncio.create_task(self._watch(process))

    async def _watch(self, process: ProcessWatch) -> None:
        await self._on_qemu_exit(await process.wait())

    async def _on_qemu_exit(self, status: int | None) -> None:
        self.exit_status = status
        if self._state in (VmState.RUNNING, VmState.PAUSED) and not self._stopping:
            self.mark_crashed(f"{self._exit_description()}\n{console_tail(self.workdir)}")
            await self._disconnect()

    def _exit_description(self) -> str:
        if self.exit_status is not None:
            return f"QEMU exited unexpectedly with status {self.exit_status}"
        pid = self._process.pid if self._process else "?"
        return (
            f"QEMU (pid {pid}) exited unexpectedly; its exit status is unknown because "
            f"another process started it"
        )

    async def _before_exit(
        self, step: Awaitable[T], what: str, deadline: float, budget: float | None = None
    ) -> T:
        """Run a boot (or attach) step unless QEMU exits or the deadline passes first.

        ``budget`` is the whole operation's time limit, for the error message
        (default: :attr:`boot_timeout`).
        """
        assert self._process is not None
        exited = self._process.exited
        task = asyncio.ensure_future(step)
        remaining = max(deadline - time.monotonic(), 0.1)
        waiters: set[asyncio.Future[Any]] = {task, exited}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            task.cancel()
            raise
        if task in done:
            try:
                return task.result()
            except (agent.AgentError, QMPError, OSError) as exc:
                raise BootError(
                    f"VM {self.id}: {what} failed: {exc}\n{console_tail(self.workdir)}"
                ) from exc
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if exited.done():
            status = exited.result()
            how = "exited" if status is None else f"exited with status {status}"
            reason = start_failure_reason(self.workdir)
            raise BootError(
                f"VM {self.id}: {reason + '; ' if reason else ''}QEMU {how} while waiting "
                f"for {what}\n{console_tail(self.workdir)}"
            )
        raise _BootTimedOut(
            f"VM {self.id}: timed out after {budget or self.boot_timeout:g}s waiting for "
            f"{what}\n{console_tail(self.workdir)}"
        )

    async def _connect_qmp(self) -> QMPClient:
        client = QMPClient(f"kelpie-{self.id}")
        while True:
            try:
                await client.connect(str(self.qmp_socket))
                return client
            except QMPError:
                await asyncio.sleep(0.01)  # QEMU has not created the socket yet

    # ---- attach -------------------------------------------------------------------------
    @classmethod
    async def attach(
        cls,
        vm_id: str,
        *,
        workdir: Path | None = None,
        kit: GuestKit | None = None,
        timeout: float = ATTACH_TIMEOUT,
    ) -> QemuVm:
        """Reconnect to a VM that an earlier process started, from its VM directory.

        The directory is ``workdir``, else ``vms_dir() / vm_id``. The VM comes back RUNNING
        or PAUSED, as QEMU reports it, with :attr:`agent_info` listing the execs still held
        by the guest agent (for a PAUSED VM the agent answers after :meth:`resume`). When
        its QEMU is gone (or the pid file names another process) the VM comes back
        CRASHED with ``crash_reason`` saying why; ``stop()`` then cleans up its sockets.

        Raises :class:`VmError` when the directory holds no Kelpie VM, and when QEMU runs
        but does not answer within ``timeout`` seconds (QEMU is then left running).
        """
        if not VM_ID_PATTERN.fullmatch(vm_id):
            raise ConfigError([f"VM id {vm_id!r} is not a Kelpie VM id (letters, digits, _.-)"])
        directory = workdir or vms_dir() / vm_id
        vm = cls(read_vm_record(directory, vm_id), vm_id=vm_id, workdir=directory, kit=kit)
        launch = vm._launch_record()
        if launch.get("accel") in ("kvm", "tcg"):
            vm.accel = AccelChoice(str(launch["accel"]), "recorded when the VM started")
        if isinstance(launch.get("guestkit_digest"), str):
            vm._kit_digest = launch["guestkit_digest"]
        await vm._reattach(timeout)
        return vm

    async def _reattach(self, timeout: float) -> None:
        self._set_state(VmState.STARTING)  # attaching, like booting, ends RUNNING/PAUSED/CRASHED
        try:
            self._track(self._find_own_qemu())
        except _QemuGone as gone:
            with contextlib.suppress(OSError):
                self._drop_interrupted_snapshot()  # no QEMU writes it any more
            self._settle_attached(VmState.CRASHED, f"VM {self.id}: {gone}")
            return
        try:
            status = await self._reconnect(timeout)
        except Exception as exc:
            if self._process is not None and not self._process.running:
                self._settle_attached(VmState.CRASHED, str(exc))  # QEMU died as we attached
                await self._disconnect()
                return
            await self._abandon_attach()
            raise
        except BaseException:  # cancelled: leave the VM as it was
            await self._abandon_attach()
            raise
        self._settle_attached(
            state_for_qmp_status(status),
            f"VM {self.id}: the guest will not run again: QMP reports status {status!r}",
        )
        if self._process is not None and not self._process.running:
            await self._on_qemu_exit(None)  # exited before RUNNING: the watcher had skipped it

    def _find_own_qemu(self) -> ProcessWatch:
        """A watch on this VM's live QEMU, as named by ``qemu.pid``; else :class:`_QemuGone`."""
        pid_file = self.workdir / "qemu.pid"
        try:
            text = pid_file.read_text().strip()
        except FileNotFoundError:
            raise _QemuGone(f"QEMU is not running: {pid_file} is missing") from None
        if not text.isdigit() or int(text) <= 0:
            raise _QemuGone(f"QEMU is not running: {pid_file} holds {text!r}, not a pid")
        pid = int(text)
        try:
            process = ProcessWatch(pid, child=False)
        except ProcessLookupError:
            raise _QemuGone(f"QEMU (pid {pid}) is no longer running") from None
        try:
            self._check_is_own_qemu(process)
        except _QemuGone:
            process.close()
            raise
        return process

    def _check_is_own_qemu(self, process: ProcessWatch) -> None:
        """Raise :class:`_QemuGone` unless ``process`` is alive and serves our QMP socket."""
        gone = _QemuGone(f"QEMU (pid {process.pid}) is no longer running")
        if process.has_exited():
            raise gone
        ours = is_qemu_of(process.pid, self.qmp_socket)
        # The pidfd names one process: alive after the command line was read, it proves the
        # command line was that process's and not a later holder of the same pid.
        if process.has_exited():
            raise gone
        if not ours:
            raise _QemuGone(
                f"QEMU is not running: qemu.pid names pid {process.pid}, which is not this "
                f"VM's QEMU (the pid was reused after QEMU exited)"
            )

    async def _reconnect(self, timeout: float) -> str:
        """Connect QMP, read the run status, connect the agent; hello if the guest runs."""
        deadline = time.monotonic() + timeout
        self._qmp = await self._before_exit(
            self._connect_qmp(), "the QMP greeting (is another process attached?)", deadline,
            timeout,
        )
        status = await self._before_exit(
            self._qmp_status(), "QMP query-status", deadline, timeout
        )
        if (self.workdir / SNAPSHOT_MARKER).exists():
            status = await self._before_exit(
                self._recover_snapshot(), "recovering from an interrupted snapshot", deadline,
                timeout,
            )
        self._agent = await self._before_exit(
            agent.AgentClient.connect_unix(str(self.agent_socket), timeout=timeout),
            "the agent socket", deadline, timeout,
        )
        if status == QMP_RUNNING:
            self.agent_info = await self._before_exit(
                self._agent.hello(), "the agent's hello (is another process attached?)",
                deadline, timeout,
            )
        return status

    async def _qmp_status(self) -> str:
        assert self._qmp is not None
        reply = await self._qmp.execute("query-status")
        return str(reply["status"]) if isinstance(reply, dict) else "unknown"

    async def _recover_snapshot(self) -> str:
        """Undo a full snapshot whose process died before it ended; return the QMP status.

        The marker says whether the snapshot would have resumed the guest. The migration
        QEMU may still be writing is cancelled first (a guest must not run while QEMU
        copies its memory: the snapshot would be torn), then the guest is brought back to
        running or paused, then the partial snapshot and the marker are removed. Should a
        step fail, the marker stays, so a later attach tries again.
        """
        assert self._qmp is not None
        marker = _read_snapshot_marker(self.workdir / SNAPSHOT_MARKER)
        resume = marker.get("resume") is not False  # unreadable: it paused a running guest
        try:
            ended = await _migration.abandon_save(self._qmp)
        except _migration.MigrationFailed as exc:
            raise VmError(
                f"VM {self.id}: cannot undo the full snapshot interrupted by the exit of the "
                f"process taking it: {exc}"
            ) from exc
        status = await self._qmp_status()
        if status not in QMP_DEAD:
            if resume and status != QMP_RUNNING:
                await self._qmp.execute("cont")  # also re-activates disks after postmigrate
            elif not resume and status == QMP_RUNNING:
                await self._qmp.execute("stop")
            status = await self._qmp_status()
        self.recovered_snapshot = str(marker.get("dest") or "?")
        _log.warning(
            "VM %s: the process taking snapshot %s (pid %s) exited before it ended; its "
            "migration ended %r; the guest is %s again and the partial snapshot is removed",
            self.id, self.recovered_snapshot, marker.get("pid", "?"), ended, status,
        )
        await asyncio.to_thread(self._drop_interrupted_snapshot, marker)
        return status

    def _drop_interrupted_snapshot(self, marker: dict[str, Any] | None = None) -> None:
        """Remove an interrupted snapshot's partial directory (never published) and marker.

        Only once no QEMU can write it any more: its migration ended, or QEMU is gone.
        """
        path = self.workdir / SNAPSHOT_MARKER
        if marker is None:
            if not path.exists():
                return
            marker = _read_snapshot_marker(path)
        partial = marker.get("partial")
        if isinstance(partial, str):
            where = Path(partial)
            if where.name.startswith(".") and where.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(where, ignore_errors=True)
        path.unlink(missing_ok=True)

    def _settle_attached(self, state: VmState, reason: str) -> None:
        """Give a re-attached VM the state its QEMU is in (from STARTING, legally).

        ``reason`` becomes ``crash_reason`` when the state is CRASHED, console tail added.
        """
        if state is VmState.CRASHED:
            self.mark_crashed(f"{reason}\n{console_tail(self.workdir)}")
        else:
            self._set_state(state)

    async def _abandon_attach(self) -> None:
        """Undo a failed attach without touching the VM: QEMU keeps running."""
        await self._let_go()
        self._set_state(VmState.STOPPED)

    async def _do_detach(self) -> None:
        await self._let_go()

    async def _let_go(self) -> None:
        """Close QMP and the agent and stop watching QEMU, which keeps running."""
        await self._disconnect()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._process is not None:
            self._process.close()
        self._process = self._watcher = None

    async def _finish_handshake(self) -> None:
        """Say hello to an agent connected while the guest was paused (attach)."""
        if self._agent is None or self._agent_ready():
            return
        with self._agent_errors():
            self.agent_info = await self._agent.hello(timeout=ATTACH_TIMEOUT)

    # ---- stop ---------------------------------------------------------------------------
    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        self._stopping = True
        try:
            await self._shut_down(force, SHUTDOWN_TIMEOUT if grace is None else grace)
        finally:
            self._stopping = False

    async def _shut_down(self, force: bool, grace: float = SHUTDOWN_TIMEOUT) -> None:
        """Agent poweroff (``grace`` seconds), else QMP quit, else SIGKILL of QEMU's group;
        then clean up."""
        process = self._process or self._unwatched_qemu()
        if process is not None and process.running:
            if not force and self._agent_ready() and self._state is VmState.RUNNING:
                await self._ask_then_wait(self._agent_poweroff(), process, grace)
            if process.running and self._qmp is not None:
                await self._ask_then_wait(self._qmp.execute("quit"), process, QUIT_TIMEOUT)
            if process.running:
                process.kill_group()
                await process.wait()
        if self._watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._disconnect()
        for name in ("qmp.sock", "agent.sock", "qemu.pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()
        self._process = None

    def _unwatched_qemu(self) -> ProcessWatch | None:
        """The QEMU of this VM directory when this object does not watch it (an attach that
        failed, e.g. while another process held QMP): stopping must not leave it running."""
        try:
            pid = int((self.workdir / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None
        if not is_qemu_of(pid, self.qmp_socket):
            return None
        try:
            return ProcessWatch(pid, child=False)
        except ProcessLookupError:
            return None

    async def _agent_poweroff(self) -> None:
        assert self._agent is not None
        await self._agent.shutdown(poweroff=True)

    @staticmethod
    async def _ask_then_wait(
        request: Awaitable[object], process: ProcessWatch, timeout: float
    ) -> None:
        """Send one shutdown request and wait for QEMU to exit; give up quietly on timeout."""
        with contextlib.suppress(agent.AgentError, QMPError, OSError, TimeoutError):
            async with asyncio.timeout(timeout):
                await request
                await process.wait()

    def _agent_ready(self) -> bool:
        return self._agent is not None and self._agent.state is agent.ClientState.READY

    async def _disconnect(self) -> None:
        agent_client, self._agent = self._agent, None
        qmp, self._qmp = self._qmp, None
        if agent_client is not None:
            await agent_client.close()
        if qmp is not None:
            # disconnect() re-raises what ended the connection (EOFError once QEMU is gone)
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    # ---- pause / resume -----------------------------------------------------------------
    async def _qmp_execute(self, command: str, **arguments: Any) -> object:
        if self._qmp is None:
            raise self._gone(f"QMP {command}")
        try:
            return await self._qmp.execute(command, arguments or None)
        except QMPError as exc:
            if not self._qemu_running():
                raise self._gone(f"QMP {command}") from exc
            raise VmError(f"VM {self.id}: QMP {command} failed: {exc}") from exc

    async def _do_pause(self) -> None:
        self._mark_snapshot(running=True)  # before the guest stops, if a snapshot pauses it
        await self._qmp_execute("stop")

    async def _do_resume(self) -> None:
        await self._qmp_execute("cont")
        await self._finish_handshake()
        await self._finish_restore()

    # ---- agent calls --------------------------------------------------------------------
    def _gone(self, doing: str) -> VmCrashed:
        status = self.exit_status
        how = f"exited with status {status}" if status is not None else "is not running"
        return VmCrashed(f"VM {self.id}: QEMU {how} during {doing}")

    def _translate(self, exc: agent.AgentError, path: str | None = None) -> VmError:
        """An agent client error as an error of Kelpie's tree."""
        if isinstance(exc, agent.AgentRemoteError):
            if path is not None:
                return GuestFileError(path, exc.code, exc.message)
            return AgentError(f"VM {self.id}: the agent refused {exc.op}: {exc}")
        if isinstance(exc, agent.AgentDisconnected):
            if not self._qemu_running():
                return self._gone("an agent call")
            return AgentError(f"VM {self.id}: lost the guest agent: {exc}")
        return AgentError(f"VM {self.id}: agent error: {exc}")

    @contextlib.contextmanager
    def _agent_errors(self, path: str | None = None) -> Iterator[None]:
        """Translate agent client errors raised in the block into Kelpie's error tree."""
        try:
            yield
        except agent.AgentError as exc:
            raise self._translate(exc, path) from exc

    def _client(self) -> agent.AgentClient:
        if self._agent is None:
            raise self._gone("an agent call")
        return self._agent

    async def _do_exec(self, request: ExecRequest) -> ExecProcess:
        client = self._client()
        try:
            handle = await client.exec(
                list(request.argv), env=dict(request.env) or None, cwd=request.cwd,
                user=request.user, stdin_open=True, timeout=request.timeout, pty=request.pty,
            )
        except agent.AgentRemoteError as exc:
            if exc.code == "ENOENT" and "cwd" not in exc.message:
                return _FinishedProcess(request, 127, f"{request.argv[0]}: command not found")
            if exc.code in ("EACCES", "ENOEXEC"):
                return _FinishedProcess(request, 126, f"{request.argv[0]}: {exc.message}")
            raise ExecError(f"cannot run {request.argv[0]!r}: {exc.message} ({exc.code})") from exc
        except agent.AgentError as exc:
            raise self._translate(exc) from exc
        process = QemuProcess(request, handle, self)
        process.exec_id = str(handle.exec_id)
        self._processes.add(process)
        return process

    async def _do_reattach_exec(self, exec_id: str) -> ExecProcess:
        try:
            number = int(exec_id)
        except ValueError:
            raise ConfigError([f"exec id {exec_id!r} is not one of this backend's (a number)"],
                              what="exec id") from None
        held = {e.exec_id: e for e in (self.agent_info.execs if self.agent_info else ())}
        argv = held[number].argv if number in held and held[number].argv else ("?",)
        try:
            handle = await self._client().attach(number)
            await handle.close_stdin()
        except agent.AgentRemoteError as exc:
            raise ExecError(f"cannot re-attach to command {exec_id}: {exc.message} "
                            f"({exc.code})") from exc
        except agent.AgentError as exc:
            raise self._translate(exc) from exc
        process = QemuProcess(ExecRequest(tuple(argv)), handle, self)
        process.exec_id = exec_id
        self._processes.add(process)
        return process

    async def _do_read_file(self, path: str) -> AsyncIterator[bytes]:
        client = self._client()
        with self._agent_errors(path):
            async for chunk in client.read_file(path):
                yield chunk

    async def _do_write_file(self, path: str, chunks: AsyncIterable[bytes], mode: int) -> None:
        with self._agent_errors(path):
            await self._client().write_file(path, chunks, mode=mode)

    async def _do_list_dir(self, path: str) -> list[FileInfo]:
        with self._agent_errors(path):
            entries = await self._client().list_dir(path)
        return [FileInfo(e.name, e.type, e.size, e.mode) for e in entries]

    async def _do_remove(self, path: str, recursive: bool) -> None:
        with self._agent_errors(path):
            await self._client().remove(path, recursive=recursive)

    async def _do_mkdir(self, path: str, mode: int) -> None:
        with self._agent_errors(path):
            await self._client().mkdir(path, parents=True, mode=mode)

    async def _do_readlink(self, path: str) -> str:
        with self._agent_errors(path):
            info = await self._client().stat(path, follow_symlinks=False)
        if info.target is None:
            raise GuestFileError(path, "EINVAL", f"not a symbolic link (a {info.type})")
        return info.target

    async def _do_agent_state(self) -> dict[str, Any]:
        info = self.agent_info
        return {
            "hostname": info.hostname if info else None,
            "root": info.root if info else None,
            "held_execs": [  # listed by the agent's hello: outlived an earlier connection
                {"exec_id": e.exec_id, "argv": list(e.argv), "running": e.running}
                for e in (info.execs if info else ())
            ],
            "commands": [  # started through this VM object and still running
                {"argv": list(p.request.argv), "cwd": p.request.cwd}
                for p in self._processes if p.exit is None
            ],
        }


    # ---- snapshots ----------------------------------------------------------------------
    async def snapshot(
        self, dest: Path, *, kind: SnapshotKind = SnapshotKind.FULL, leave_paused: bool = False
    ) -> VmSnapshot:
        """Write a snapshot of this VM to the new directory ``dest`` (see the base class).

        While a full snapshot is taken, ``snapshot-in-progress.json`` in the VM directory
        says so, written before the guest pauses and removed once it is back as it should
        be: if this process dies in between, :meth:`attach` undoes the snapshot.
        """
        if kind is not SnapshotKind.FULL:
            return await super().snapshot(dest, kind=kind, leave_paused=leave_paused)
        plan = _SnapshotPlan(self, dest, leave_paused)
        token = _SNAPSHOT_PLAN.set(plan)
        try:
            return await super().snapshot(dest, kind=kind, leave_paused=leave_paused)
        finally:
            _SNAPSHOT_PLAN.reset(token)
            if plan.marked:
                with contextlib.suppress(FileNotFoundError):
                    (self.workdir / SNAPSHOT_MARKER).unlink()

    def _mark_snapshot(self, *, running: bool) -> None:
        """Write the marker of the full snapshot this task is taking of this VM, once.

        Called (under the base class's lock) before a running guest is paused, else when
        the snapshot of a paused one starts. Not fsynced: it guards against the death of
        this process, not of the host, which QEMU would not survive either.
        """
        plan = _SNAPSHOT_PLAN.get()
        if plan is None or plan.vm is not self or plan.marked:
            return
        marker = {
            "was_running": running,
            "resume": running and not plan.leave_paused,
            "dest": str(plan.dest),
            "partial": str(partial_dir_of(plan.dest)),
            "pid": os.getpid(),
        }
        path = self.workdir / SNAPSHOT_MARKER
        temporary = path.with_name(f".{SNAPSHOT_MARKER}.tmp")
        with _storage_errors(f"writing the snapshot marker {path}"):
            temporary.write_text(json.dumps(marker) + "\n")
            temporary.replace(path)
        plan.marked = True

    async def _do_snapshot(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        if kind is SnapshotKind.FULL:
            return await self._full_snapshot(dest)
        if kind is SnapshotKind.CHECKPOINT:  # from the running guest, through the agent
            return await capture_checkpoint(self, dest)
        return await self._disk_snapshot(dest)

    async def _full_snapshot(self, dest: Path) -> VmSnapshot:
        """Memory and device state (QMP migrate to a file) plus the disk overlay.

        The base class paused the guest (QMP ``stop``, which also drains and flushes the
        disks). When the migration completes QEMU inactivates the disks (flushing again),
        so the overlay is copied in a consistent state; ``cont`` re-activates them.
        """
        qmp = self._qmp
        if qmp is None or not self._qemu_running():
            raise self._gone("snapshot")
        self._mark_snapshot(running=False)  # a paused guest: no-op if the pause marked it
        status = await self._qmp_execute("query-status")
        if isinstance(status, dict) and status.get("status") == "postmigrate":
            # Paused since an earlier snapshot: QEMU 7.2 refuses to migrate a VM "paused
            # due to previous migration", and only cont re-activates its disks.
            await self._qmp_execute("cont")
            await self._qmp_execute("stop")
        record = await self._snapshot_record(SnapshotKind.FULL)
        with SnapshotWriter(dest) as writer:
            memory = writer.blob_path(MEMORY_BLOB)
            try:
                stats = await self._unless_gone(
                    _migration.save_state(qmp, memory, bandwidth=self.snapshot_bandwidth),
                    "snapshot",
                )
            except (_migration.MigrationFailed, QMPError, OSError) as exc:
                if not self._qemu_running():
                    raise self._gone("snapshot") from exc
                raise SnapshotError(_save_failure(self.id, str(exc))) from exc
            record = dataclasses.replace(record, migration=_migration_summary(stats))
            with _storage_errors(f"the snapshot's memory blob {memory}"):
                await asyncio.to_thread(_snapshot.sync_file, memory)
                await asyncio.to_thread(writer.adopt_blob, MEMORY_BLOB)
            return await self._finish_snapshot(writer, record, SnapshotKind.FULL)

    async def _disk_snapshot(self, dest: Path) -> VmSnapshot:
        """The overlay of a stopped VM (QEMU has exited and flushed it)."""
        record = await self._snapshot_record(SnapshotKind.DISK)
        with SnapshotWriter(dest) as writer:
            return await self._finish_snapshot(writer, record, SnapshotKind.DISK)

    async def _snapshot_record(self, kind: SnapshotKind) -> SnapshotRecord:
        launch = self._launch_record()
        accel = self.accel.accel if self.accel else str(launch.get("accel", "tcg"))
        hostname = str(launch.get("hostname") or self.config.hostname or f"kelpie-{self.id[:8]}")
        base = self.config.root_disk
        signature: tuple[str, ...] = ()
        if kind is SnapshotKind.FULL:
            signature = tuple(device_signature(QemuLaunch(
                qemu="", config=self.config, kernel=Path(), initrd=Path(), workdir=self.workdir,
                accel=accel, hostname=hostname,
                overlay=None if base is None else self.workdir / "overlay.qcow2",
            )))
        return SnapshotRecord(
            config=self.config, hostname=hostname, accel=accel,
            base_path=None if base is None else base.resolve(),
            base_format=None if base is None else await asyncio.to_thread(
                _snapshot.image_format, base
            ),
            signature=signature,
        )

    async def _finish_snapshot(
        self, writer: SnapshotWriter, record: SnapshotRecord, kind: SnapshotKind
    ) -> VmSnapshot:
        """Add the disk overlay, then publish the manifest."""
        base_digest = None
        if record.base_path is not None:
            try:
                base_digest = await asyncio.to_thread(_snapshot.file_digest, record.base_path)
            except OSError as exc:
                raise SnapshotError(
                    f"VM {self.id}: cannot read its base image {record.base_path}: {exc}"
                ) from exc
            overlay = self.workdir / "overlay.qcow2"
            if overlay.exists():
                with _storage_errors(f"copying the disk overlay {overlay} into the snapshot"):
                    await asyncio.to_thread(
                        _snapshot.copy_file, overlay, writer.blob_path(DISK_BLOB)
                    )
                    await asyncio.to_thread(writer.adopt_blob, DISK_BLOB)
        host = self.host_info()
        return writer.commit(
            kind=kind, backend=host.backend, backend_version=host.backend_version,
            arch=host.arch, cpu_model=_cpu_model(record.accel), machine=host.machine,
            vcpus=self.config.vcpus, memory_mib=self.config.memory_mib,
            guestkit_digest=self._kit_digest, base_image_digest=base_digest, vm_id=self.id,
            extra=record.to_extra(),
        )

    async def _unless_gone(self, step: Awaitable[T], doing: str) -> T:
        """Run ``step`` unless QEMU exits first (then :class:`VmCrashed`).

        Cancelled, ``step`` is cancelled and awaited, so its clean-up (e.g. cancelling a
        migration in QEMU) is over before the cancellation propagates.
        """
        process = self._process
        if process is None or not process.running:
            raise self._gone(doing)
        task = asyncio.ensure_future(step)
        waiters: set[asyncio.Future[Any]] = {task, process.exited}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            await asyncio.wait({task})
            raise
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task})
        raise self._gone(doing)

    # ---- restore ------------------------------------------------------------------------
    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Rebuild the snapshot's VM here: checks first, then the disk, then QEMU.

        Everything that can refuse the snapshot (its record, the base image, the guest
        kit, the device signature) is checked before the VM directory changes or any QEMU
        starts. A full restore loads the VM state into a QEMU started with ``-incoming
        defer``, then the guest resyncs (clock, RNG reseed, host name); a disk restore
        boots the base image with the saved overlay; a checkpoint restore boots this VM's
        own configuration fresh and writes the workspace back (:meth:`_restore_checkpoint`).
        """
        if snapshot.manifest.kind is SnapshotKind.CHECKPOINT:
            await self._restore_checkpoint(snapshot, paused=paused)
            return
        manifest = snapshot.manifest
        kind = manifest.kind
        record = SnapshotRecord.from_manifest(manifest)
        base = None
        if record.base_path is not None:
            if manifest.base_image_digest is None:
                raise SnapshotIncompatible(["the snapshot names no digest for its base image"])
            candidates = [p for p in (self.config.root_disk, record.base_path) if p is not None]
            base = await asyncio.to_thread(
                _snapshot.find_base_image, manifest.base_image_digest, candidates
            )
        config = _snapshot.restored_config(record.config, self.config, kind, base)
        launch = await self._prepare_launch(config, incoming=kind is SnapshotKind.FULL)
        manifest.check_restorable(self.host_info())
        if kind is SnapshotKind.FULL:
            signature = tuple(device_signature(dataclasses.replace(
                launch, overlay=None if base is None else self.workdir / "overlay.qcow2",
            )))
            if signature != record.signature:
                raise SnapshotIncompatible([_signature_mismatch(record.signature, signature)])
        # Checked: from here on the VM directory changes (undone if the restore fails).
        reason = (
            f"VM {self.id} was restored from snapshot {snapshot.path} while this command "
            f"ran; commands do not survive a restore (their agent connection ended when the "
            f"VM stopped): run it again"
        )
        for process in list(self._processes):
            if process.exit is None:
                process.interrupt(reason)
        self._processes.clear()
        overlay = self.workdir / "overlay.qcow2"
        async with self._disk_replaced(launch, config):
            if base is not None and DISK_BLOB in manifest.blobs:
                assert record.base_format is not None
                await _snapshot.install_overlay(
                    snapshot.blob_path(DISK_BLOB), overlay, base, record.base_format
                )
                launch = dataclasses.replace(launch, overlay=overlay)
            elif base is not None:
                launch = dataclasses.replace(launch, overlay=await self._prepare_overlay())
            if kind is SnapshotKind.FULL:
                await self._resume_state(snapshot, launch, paused=paused,
                                         same_vm=manifest.vm_id == self.id)
            else:
                await self._boot(launch)
                if paused:
                    await self._qmp_execute("stop")

    @contextlib.asynccontextmanager
    async def _disk_replaced(self, launch: QemuLaunch, config: VmConfig) -> AsyncIterator[None]:
        """Switch to ``config`` with this VM's disk overlay set aside for the block; if the
        block fails, put the old overlay (or none) and config back."""
        old_config = self._config
        overlay = self.workdir / "overlay.qcow2"
        kept = self.workdir / ".overlay.qcow2.before-restore"
        self._prepare_workdir(launch)
        self._config = config
        try:
            if overlay.exists():
                overlay.replace(kept)
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if kept.exists():
                    kept.replace(overlay)  # QEMU, stopped next, keeps the new one open
                else:
                    overlay.unlink(missing_ok=True)
                self._config = old_config
                self._write_record(dataclasses.replace(launch, config=old_config))
            raise
        kept.unlink(missing_ok=True)

    async def _restore_checkpoint(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Boot fresh from this VM's own configuration, then write the checkpoint into it.

        Architecture and backend independent (see :mod:`kelpie.vm._checkpoint`): the
        checkpoint is read and checked whole before anything changes; its env joins the
        config's. A disk overlay from this VM's earlier life is set aside (put back if the
        restore fails), so the guest starts from its image like a new VM.
        """
        content = read_checkpoint(snapshot, self)
        config = checkpoint_config(self._config, content)
        launch = await self._prepare_launch(config)
        async with self._disk_replaced(launch, config):
            await self._boot(dataclasses.replace(launch, overlay=await self._prepare_overlay()))
            await replay_checkpoint(self, content)
            if paused:
                await self._qmp_execute("stop")

    async def _resume_state(
        self, snapshot: VmSnapshot, launch: QemuLaunch, *, paused: bool, same_vm: bool
    ) -> None:
        """Start QEMU waiting for a migration, load the snapshot's VM state into it."""
        await self._spawn(build_command(launch))
        deadline = time.monotonic() + self.boot_timeout
        self._qmp = await self._before_exit(self._connect_qmp(), "the QMP socket", deadline)
        await self._before_exit(
            _migration.load_state(self._qmp, snapshot.blob_path(MEMORY_BLOB)),
            "loading the snapshot's VM state", deadline,
        )
        # Connected before the guest runs: it then sees its host as still connected and
        # keeps reading; the hello ends the session it had with the snapshotted VM's host.
        self._agent = await self._before_exit(
            agent.AgentClient.connect_unix(str(self.agent_socket), timeout=self.boot_timeout),
            "the agent socket", deadline,
        )
        plan = {"hostname": None if same_vm else launch.hostname}
        (self.workdir / PENDING_RESYNC).write_text(json.dumps(plan) + "\n")
        if paused:
            return  # resume() says hello and resyncs the guest
        await self._before_exit(self._qmp.execute("cont"), "QMP cont", deadline)
        self.agent_info = await self._before_exit(
            self._agent.hello(), "the guest agent's hello", deadline
        )
        await self._before_exit(self._finish_restore(), "the guest agent's resync", deadline)

    async def _finish_restore(self) -> None:
        """Resync a restored guest once it runs: clock, RNG (reseeded), host name.

        The plan is a file in the VM directory, so that a process attaching to a VM left
        paused by a restore still resyncs it on resume.
        """
        pending = self.workdir / PENDING_RESYNC
        try:
            plan = json.loads(pending.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            plan = {}
        hostname = plan.get("hostname") if isinstance(plan, dict) else None
        with self._agent_errors():
            await self._client().resync(
                epoch_ns=time.time_ns(), entropy=os.urandom(RESTORE_ENTROPY_BYTES),
                hostname=hostname if isinstance(hostname, str) else None,
            )
        pending.unlink(missing_ok=True)


@contextlib.contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what}: {exc.strerror or exc}") from exc


def _read_snapshot_marker(path: Path) -> dict[str, Any]:
    """The snapshot marker's content; empty when it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_failure(vm_id: str, reason: str) -> str:
    message = f"VM {vm_id}: QEMU could not save the VM state: {reason}"
    if "VirtFS" in reason or "9p" in reason:
        message += (
            "; QEMU cannot snapshot the memory of a VM with a mounted shared directory "
            "(virtio-9p): take a disk snapshot of the stopped VM, or run without mounts"
        )
    return message


def _migration_summary(stats: dict[str, Any]) -> dict[str, Any]:
    ram = stats.get("ram") if isinstance(stats.get("ram"), dict) else {}
    assert isinstance(ram, dict)
    return {
        "total_time_ms": stats.get("total-time"),
        "ram_total": ram.get("total"),
        "ram_transferred": ram.get("transferred"),
        "normal_pages": ram.get("normal"),
        "zero_pages": ram.get("duplicate"),
    }


def _signature_mismatch(recorded: Sequence[str], here: Sequence[str]) -> str:
    only_then = [arg for arg in recorded if arg not in here]
    only_now = [arg for arg in here if arg not in recorded]
    return (
        f"QEMU devices: the snapshot's VM was started with {only_then or 'the same options'}"
        f", a restore here would use {only_now or 'the same options in another order'}; "
        f"restore it with the Kelpie version that took it"
    )


_VERSIONS: dict[str, str] = {}


def _qemu_version(qemu: str) -> str:
    """``7.2.0``-style version of a QEMU binary (cached per binary)."""
    if qemu not in _VERSIONS:
        import subprocess

        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
        words = out.stdout.split()
        version = words[3] if len(words) > 3 and words[2] == "version" else "unknown"
        _VERSIONS[qemu] = version.split("(")[0]
    return _VERSIONS[qemu]


def _cpu_model(accel: str) -> str:
    """The guest CPU model QEMU emulates: the host's under KVM, QEMU's default under TCG."""
    return "host" if accel == "kvm" else "qemu64"


def make_qemu(config: VmConfig, **options: Any) -> QemuVm:
    """Factory hook for the backend registry."""
    return QemuVm(config, **options)
