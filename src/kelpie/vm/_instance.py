"""VmInstance: the async interface every backend implements, and the lifecycle it guards.

Backends subclass :class:`VmInstance` and implement the ``_do_*`` hooks. The public
methods here check the state table before calling a hook, move the VM through its states,
and roll back cleanly when a hook fails, so every backend gets the same lifecycle rules.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import enum
import math
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Protocol, runtime_checkable

from kelpie._exceptions import (
    BootError,
    ConfigError,
    ExecTimeout,
    GuestFileError,
    InvalidStateError,
    KelpieError,
    UnsupportedOperation,
    VmCrashed,
)
from kelpie.protocol import MAX_FRAME_PAYLOAD
from kelpie.vm._config import NetworkMode, VmConfig
from kelpie.vm._snapshot import HostInfo, SnapshotKind, VmSnapshot
from kelpie.vm._state import Operation, VmState, allowed_states, is_legal
from kelpie.vm._tree import TreeEntry
from kelpie.vm._usage import GuestProcesses, GuestUsage, HostUsage

MAX_ARGV = 4096
MAX_ARG_LENGTH = 128 * 1024
MAX_REQUEST_BYTES = MAX_FRAME_PAYLOAD * 3 // 4  # 192 KiB
"""argv plus env, in bytes: an exec request travels to the guest agent as one frame of at
most ``MAX_FRAME_PAYLOAD`` (256 KiB); the last quarter is left for JSON quoting and the
request's other fields."""
TIMEOUT_GRACE_SECONDS = 5.0
"""How long past an exec's timeout the host waits for the guest to report the kill."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so callers can ask before they try."""

    pause: bool = False
    snapshot_kinds: frozenset[SnapshotKind] = frozenset()
    shared_dirs: bool = False
    vsock: bool = False
    networking: bool = False
    pty: bool = False
    live_migration: bool = False
    """A running VM can be moved to another host while it runs (``send_live``)."""
    egress_policy: bool = False
    """The backend enforces network ``policy`` and egress rules (host-side)."""
    emulation: bool = False
    """The backend runs guests of another architecture than the host's (emulated)."""
    shared_memory: bool = False
    """A ``shareable`` full snapshot keeps the RAM so that every restore of it maps it
    copy-on-write: N clones cost the pages they write, not N times the memory."""
    grow_disk: bool = False
    """The root disk of a running VM can grow, its file system with it (``grow_disk``)."""

    def names(self) -> list[str]:
        """The capability names this backend has, e.g. ``["pause", "snapshot:full"]``."""
        names = [
            name
            for name in ("pause", "shared_dirs", "vsock", "networking", "pty", "live_migration",
                         "egress_policy", "emulation", "shared_memory", "grow_disk")
            if getattr(self, name)
        ]
        names += [f"snapshot:{k.value}" for k in SnapshotKind if k in self.snapshot_kinds]
        return names


@runtime_checkable
class NetworkChangeable(Protocol):
    """A VM whose network rules can change while it runs (backends with ``egress_policy``)."""

    async def change_network(self, config: VmConfig) -> None:
        """Apply ``config``'s network mode (nat or policy) and egress rules now."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """The outcome of a finished command.

    ``exit_code`` is the process's exit status, or ``128 + N`` when signal N killed it
    (``signal`` is then N). ``duration`` is in seconds.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float
    signal: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.exit_code == 0


class StreamName(enum.StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


@dataclasses.dataclass(frozen=True)
class ExecOutput:
    """A chunk of output from a running command."""

    stream: StreamName
    data: bytes


@dataclasses.dataclass(frozen=True)
class ExecExit:
    """The last event of a command: how it ended (``warning``: what may explain a failure,
    e.g. a full root disk, when the runtime knows)."""

    exit_code: int
    duration: float
    signal: int | None = None
    timed_out: bool = False
    warning: str | None = None


ExecEvent = ExecOutput | ExecExit


@dataclasses.dataclass(frozen=True)
class ExecRequest:
    """A validated command to run in the guest."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = None
    pty: bool = False
    keep_running: bool = False
    """It outlives this request's stream, for :meth:`VmInstance.reattach_exec`."""
    stdin: bytes | None = None
    """The command's whole stdin, given up front (``b""``: none), then end of file; None:
    stdin stays open for :meth:`ExecProcess.write_stdin` until ``close_stdin``."""

    def __post_init__(self) -> None:
        problems = _request_problems(self)
        if problems:
            raise ConfigError(problems, what="exec request")


def _request_problems(request: ExecRequest) -> list[str]:
    """Everything the guest agent would refuse in ``request`` (checked here, so that every
    backend refuses it the same way, before it reaches a guest)."""
    problems = []
    argv, env, cwd = request.argv, request.env, request.cwd
    if not argv:
        problems.append("argv is empty; give at least the program to run")
    elif argv[0] == "":
        problems.append("argv[0] is empty; it must name the program to run")
    if len(argv) > MAX_ARGV:
        problems.append(f"argv has {len(argv)} items; at most {MAX_ARGV} allowed")
    size = 0
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):  # untyped callers
            problems.append(  # type: ignore[unreachable]
                f"argv[{i}] must be a string, got {type(arg).__name__}"
            )
        elif "\0" in arg or len(arg) > MAX_ARG_LENGTH:
            problems.append(f"argv[{i}] contains NUL or is over {MAX_ARG_LENGTH} characters")
        else:
            size += len(arg.encode(errors="surrogateescape"))
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):  # untyped callers
            problems.append(  # type: ignore[unreachable]
                f"env {name!r} must map a string to a string, got {type(value).__name__}"
            )
        elif not name or "=" in name or "\0" in name or "\0" in value:
            problems.append(f"env {name!r} must be a non-empty name without '=' or NUL")
        else:
            size += len(name.encode(errors="surrogateescape"))
            size += len(value.encode(errors="surrogateescape"))
    if size > MAX_REQUEST_BYTES:
        problems.append(
            f"argv and env hold {size} bytes; at most {MAX_REQUEST_BYTES} fit in one request "
            f"to the guest (pass large data through stdin or a file)"
        )
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd):
        problems.append(f"cwd {cwd!r} must be an absolute guest path without NUL")
    user = request.user
    if user is not None and (not isinstance(user, str) or not user or "\0" in user):
        problems.append(f"user {user!r} must be a non-empty user name or uid without NUL")
    timeout = request.timeout
    if timeout is not None and not (isinstance(timeout, int | float) and 0 < timeout < math.inf):
        problems.append(f"timeout is {timeout}; it must be a positive number of seconds")
    return problems


class ExecProcess(abc.ABC):
    """A command running in the guest: feed it stdin, signal it, read its events.

    Iterating yields :class:`ExecOutput` chunks and ends with one :class:`ExecExit`.
    """

    def __init__(self, request: ExecRequest) -> None:
        self.request = request
        self.exit: ExecExit | None = None
        self.exec_id: str | None = None
        """The backend's name for this command, for :meth:`VmInstance.reattach_exec`
        (None when the backend cannot re-attach to commands)."""
        self.pid: int | None = None
        """The command's process id in the guest (None: the backend does not say)."""
        self.output_offset: int | None = 0
        """Bytes of output the command had produced before the first this object yields
        (for a re-attached one; None: the backend cannot say)."""
        self.stdin_taken = False
        """The backend started the command with the request's up-front stdin (so nothing
        is left to write; else :meth:`VmInstance.exec_stream` writes and closes it)."""

    @abc.abstractmethod
    async def write_stdin(self, data: bytes) -> None:
        """Send bytes to the command's stdin."""

    @abc.abstractmethod
    async def close_stdin(self) -> None:
        """Signal end of input."""

    @abc.abstractmethod
    async def send_signal(self, signum: int) -> None:
        """Deliver a signal to the command's process group."""

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the command's terminal (only for ``pty=True``)."""
        raise UnsupportedOperation(type(self).__name__, "terminal resize")

    @abc.abstractmethod
    def _events(self) -> AsyncIterator[ExecEvent]:
        """The backend's event stream; must end with exactly one ExecExit."""

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        async for event in self._events():
            if isinstance(event, ExecExit):
                self.exit = event
            yield event

    async def wait(self) -> ExecResult:
        """Drain the remaining events and return the result.

        The result's output is what had not been read yet: everything if the events were
        never iterated, nothing if they were iterated to the end.
        """
        out: list[bytes] = []
        err: list[bytes] = []
        if self.exit is None:
            async for event in self:
                if isinstance(event, ExecOutput):
                    (out if event.stream is StreamName.STDOUT else err).append(event.data)
        stdout, stderr = b"".join(out), b"".join(err)
        exit_ = self.exit
        if exit_ is None:  # pragma: no cover - a backend bug
            raise KelpieError(f"exec of {self.request.argv[0]!r} ended without an exit status")
        if exit_.timed_out:
            raise ExecTimeout(self.request.argv, self.request.timeout or 0.0, stdout, stderr)
        return ExecResult(exit_.exit_code, stdout, stderr, exit_.duration, exit_.signal)


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """An entry in the guest's file system."""

    name: str
    type: str  # "file", "dir", "symlink", "other"
    size: int
    mode: int


FileData = bytes | AsyncIterable[bytes]
TransitionObserver = Callable[["VmInstance", VmState, VmState], None]


class VmInstance(abc.ABC):
    """One VM, whatever the backend. Every method is guarded by the state table.

    Create instances through :class:`~kelpie.VmFactory` (or a backend's constructor), then
    ``await vm.start()``. Illegal calls raise :class:`InvalidStateError` naming the current
    state and the states that would allow the call.
    """

    backend_name: ClassVar[str] = "abstract"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: VmConfig, *, vm_id: str | None = None) -> None:
        if (config.network is NetworkMode.POLICY or not config.egress.empty) \
                and not self.capabilities.egress_policy:
            # never run a sandbox whose rules would not be enforced: refuse it
            raise ConfigError([f"backend {self.backend_name} cannot enforce egress rules "
                               f"(network {config.network.value}, {config.egress}); use "
                               "network nat without rules or none, or a backend that can"])
        host = HostInfo.current_arch()
        if config.arch not in (None, host) and not self.capabilities.emulation:
            raise ConfigError([f"backend {self.backend_name} runs {host} guests only (this "
                               f"host's); an {config.arch} guest needs a backend that "
                               f"emulates it, such as qemu"])
        self._config = config
        self._id = vm_id or uuid.uuid4().hex[:12]
        self._state = VmState.CREATED
        self._lifecycle = asyncio.Lock()
        self.crash_reason: str | None = None
        self.transitions: list[tuple[VmState, VmState]] = []
        self._observers: list[TransitionObserver] = []
        self.checkpoint_workspace: str | None = None
        """The guest directory checkpoints of this VM carry and restore into; None: the
        default (``/workspace`` for a capture, the checkpoint's own for a restore). See
        :mod:`kelpie.vm._checkpoint`."""

    # ---- identity and state -------------------------------------------------------------
    @property
    def id(self) -> str:
        """This VM's id (unique among the VMs of one host)."""
        return self._id

    @property
    def config(self) -> VmConfig:
        """The configuration this VM was created with."""
        return self._config

    @property
    def state(self) -> VmState:
        """The current lifecycle state."""
        return self._state

    def observe(self, observer: TransitionObserver) -> None:
        """Call ``observer(vm, old, new)`` after every state change."""
        self._observers.append(observer)

    def _set_state(self, new: VmState) -> None:
        old = self._state
        if old is new:
            return
        if not is_legal(old, new):  # a bug in a backend or in this class, never user input
            raise AssertionError(f"illegal VM transition {old} -> {new} for {self._id}")
        self._state = new
        self.transitions.append((old, new))
        for observer in self._observers:
            observer(self, old, new)

    def _require(self, operation: Operation) -> None:
        allowed = allowed_states(operation)
        if self._state not in allowed:
            raise InvalidStateError(self._id, operation.value, self._state, allowed)

    def _require_capability(self, present: bool, operation: str, capability: str) -> None:
        if not present:
            from kelpie.vm._factory import backends_with  # factory imports this module

            raise UnsupportedOperation(self.backend_name, operation, backends_with(capability))

    def mark_crashed(self, reason: str) -> None:
        """Record that the VM died underneath us (called by backends' watchers)."""
        if self._state in (VmState.STARTING, VmState.RUNNING, VmState.PAUSED):
            self.crash_reason = reason
            self._set_state(VmState.CRASHED)

    @contextlib.contextmanager
    def _crash_guard(self) -> Iterator[None]:
        """Turn a VmCrashed from a hook into the CRASHED state before it propagates."""
        try:
            yield
        except VmCrashed as exc:
            self.mark_crashed(str(exc))
            raise

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Boot the VM and wait until its guest agent answers."""
        async with self._lifecycle:
            self._require(Operation.START)
            self._set_state(VmState.STARTING)
            self.crash_reason = None
            await self._run_startup(self._do_start(), "start")
            self._set_state(VmState.RUNNING)

    async def _run_startup(self, hook: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await hook
        except BaseException as exc:
            # Roll back: release whatever the backend acquired, then settle in a state that
            # says what happened. Cancellation propagates unchanged.
            with contextlib.suppress(Exception):
                await self._do_stop(force=True)
            if isinstance(exc, VmCrashed):
                self.mark_crashed(str(exc))
            elif self._state is VmState.STARTING:
                self._set_state(VmState.STOPPED)
            if isinstance(exc, KelpieError | asyncio.CancelledError) or not isinstance(
                exc, Exception
            ):
                raise
            raise BootError(f"{what} of VM {self._id} failed: {exc}") from exc

    async def stop(self, *, force: bool = False, grace: float | None = None) -> None:
        """Shut the VM down and release its resources. A no-op on a stopped VM.

        ``force`` skips the graceful guest shutdown; ``grace`` bounds it in seconds (the
        backend's own default when None), after which the VM is shut down hard.
        """
        if grace is not None and not grace >= 0:
            raise ConfigError([f"grace is {grace}; give seconds >= 0"], what="stop")
        async with self._lifecycle:
            self._require(Operation.STOP)
            if self._state is VmState.STOPPED:
                return
            try:
                await self._do_stop(force=force or grace == 0, grace=grace)
            finally:
                self._set_state(VmState.STOPPED)

    async def pause(self) -> None:
        """Freeze the guest's vCPUs; its memory and devices stay as they are."""
        async with self._lifecycle:
            self._require(Operation.PAUSE)
            self._require_capability(self.capabilities.pause, "pause", "pause")
            with self._crash_guard():
                await self._do_pause()
            self._set_state(VmState.PAUSED)

    async def resume(self) -> None:
        """Let a paused guest run again."""
        async with self._lifecycle:
            self._require(Operation.RESUME)
            with self._crash_guard():
                await self._do_resume()
            self._set_state(VmState.RUNNING)

    # ---- commands -----------------------------------------------------------------------
    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run a command to completion and return its exit code and output.

        A command that outlives ``timeout`` seconds is killed with its whole process group
        and :class:`ExecTimeout` is raised, carrying the output produced so far.
        """
        async with self.exec_stream(
            argv, env=env, cwd=cwd, timeout=timeout, user=user, stdin=stdin or b""
        ) as process:
            return await process.wait()

    @contextlib.asynccontextmanager
    async def exec_stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        user: str | None = None,
        pty: bool = False,
        keep_running: bool = False,
        stdin: bytes | None = None,
    ) -> AsyncIterator[ExecProcess]:
        """Start a command and stream it: write stdin, send signals, iterate its events.

        Leaving the ``async with`` block before the command ended kills it, unless
        ``keep_running``: then it goes on in the guest, unobserved. ``stdin``: the
        command's whole stdin given up front (``b""``: none), sent with it where the
        backend can (one message to the guest less), its end of file after it; None keeps
        stdin open for :meth:`ExecProcess.write_stdin`.
        """
        self._require(Operation.EXEC)
        if pty:
            self._require_capability(self.capabilities.pty, "exec with a terminal", "pty")
        merged_env = {**self._config.env, **(env or {})}  # the call's env wins over the VM's
        request = ExecRequest(tuple(argv), merged_env, cwd, user, timeout, pty, keep_running,
                              stdin)
        with self._crash_guard():
            process = await self._do_exec(request)
        try:
            if stdin is not None and not process.stdin_taken:
                if stdin:
                    await process.write_stdin(stdin)
                await process.close_stdin()
            yield process
        finally:
            if process.exit is None and self._state is VmState.RUNNING and not keep_running:
                with contextlib.suppress(KelpieError):
                    await process.send_signal(9)

    async def detach(self) -> None:
        """Let go of the VM without stopping it: close this object's connections to it.

        For backends whose VMs outlive the host process (see :attr:`BackendSpec.attach`),
        so that another object (another runtime, a restarted daemon) can attach. The
        object must not be used afterwards. A no-op on backends without such VMs.
        """
        await self._do_detach()

    async def reattach_exec(self, exec_id: str, *, offset: int | None = None) -> ExecProcess:
        """Take over a command started through an earlier VM object (e.g. by a daemon that
        was restarted since), by its :attr:`ExecProcess.exec_id`: its output not read yet,
        then its exit. Its stdin is closed. :class:`UnsupportedOperation` on backends whose
        commands do not outlive the host process.

        ``offset``: the bytes of its output the caller has; the output after them that
        the backend kept comes first (output in flight when the VM's host process changed
        is otherwise lost), from :attr:`ExecProcess.output_offset` on.
        """
        self._require(Operation.EXEC)
        with self._crash_guard():
            return await self._do_reattach_exec(exec_id, offset)

    # ---- its disk -----------------------------------------------------------------------
    async def grow_disk(self, disk_mib: int) -> None:
        """Grow the running VM's root disk to ``disk_mib`` MiB and its file system with it,
        while the guest runs (e.g. a fork or a template's sandbox given a bigger disk).

        A disk only grows: ``ConfigError`` for a size below the current one, or for a VM
        without a root disk of a known size. The config (``disk_mib``) follows.
        """
        self._require_capability(self.capabilities.grow_disk, "grow a root disk", "grow_disk")
        self._require(Operation.GROW_DISK)
        current = self._config.disk_mib
        if current is None:
            raise ConfigError([f"VM {self._id} has no root disk of a known size to grow"],
                              what="disk_mib")
        if disk_mib < current:
            raise ConfigError([f"disk_mib is {disk_mib}, smaller than the disk of {current} MiB "
                               f"VM {self._id} has; a disk can only grow"], what="disk_mib")
        self._config.evolve(disk_mib=disk_mib)  # checks the range
        if disk_mib == current:
            return
        with self._crash_guard():
            await self._do_grow_disk(disk_mib)
        self._config = self._config.evolve(disk_mib=disk_mib)

    # ---- what it uses -------------------------------------------------------------------
    def host_usage(self) -> HostUsage | None:
        """The host's view of the VM (its VMM process, its files); None when the backend
        has no process of its own or the VM is not running."""
        return None

    async def guest_usage(self) -> GuestUsage:
        """The guest kernel's own counters: CPU, memory, root disk, network, processes."""
        self._require(Operation.EXEC)
        with self._crash_guard():
            return await self._do_guest_usage()

    async def guest_processes(self) -> GuestProcesses:
        """The guest's processes (``ps``)."""
        self._require(Operation.EXEC)
        with self._crash_guard():
            return await self._do_guest_processes()

    async def sweep_processes(self, keep: Collection[int] = ()) -> int:
        """Kill every guest process but init, the agent, kernel threads and ``keep`` (what
        a build step left running); how many would not die."""
        self._require(Operation.EXEC)
        with self._crash_guard():
            return await self._do_sweep_processes(keep)

    async def mark_tree(self) -> int:
        """Have the guest remember its root file system now; the mark for
        :meth:`layer_since`."""
        self._require(Operation.FILES)
        with self._crash_guard():
            return await self._do_mark_tree()

    async def layer_since(self, mark: int, out: BinaryIO) -> tuple[int, int]:
        """Write into ``out`` what changed in the guest's root file system since ``mark``,
        as an OCI layer tar the guest made (untrusted: check it before use); the next mark
        and the number of entries."""
        self._require(Operation.FILES)
        with self._crash_guard():
            return await self._do_layer_since(mark, out)

    # ---- files --------------------------------------------------------------------------
    async def walk(self, path: str = "/") -> list[TreeEntry]:
        """Every entry of the guest's root file system below ``path``, not crossing into
        other mounts, as its agent reports it (checked as untrusted): what a commit
        compares with the image."""
        self._require(Operation.FILES)
        with self._crash_guard():
            return await self._do_walk(path)

    async def read_file(self, path: str) -> bytes:
        """Read a whole file from the guest."""
        return b"".join([chunk async for chunk in self.read_file_stream(path)])

    async def read_file_stream(self, path: str) -> AsyncIterator[bytes]:
        """Read a file from the guest in chunks."""
        self._require(Operation.FILES)
        _check_guest_path(path)
        with self._crash_guard():
            async for chunk in self._do_read_file(path):
                yield chunk

    async def write_file(self, path: str, data: FileData, *, mode: int = 0o644) -> None:
        """Write a file in the guest atomically (streamed from an async iterable if given)."""
        self._require(Operation.FILES)
        _check_guest_path(path)
        if not 0 <= mode <= 0o7777:
            raise ConfigError([f"mode {mode:o} is not a permission mode (0..7777 octal)"])
        chunks = _single(data) if isinstance(data, bytes | bytearray | memoryview) else data
        with self._crash_guard():
            await self._do_write_file(path, chunks, mode)

    async def list_dir(self, path: str) -> list[FileInfo]:
        """List a directory in the guest."""
        self._require(Operation.FILES)
        _check_guest_path(path)
        with self._crash_guard():
            return await self._do_list_dir(path)

    async def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """Create a guest directory and its missing parents (an existing one is fine)."""
        self._require(Operation.FILES)
        _check_guest_path(path)
        if not 0 <= mode <= 0o7777:
            raise ConfigError([f"mode {mode:o} is not a permission mode (0..7777 octal)"])
        with self._crash_guard():
            await self._do_mkdir(path, mode)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file (or, with ``recursive``, a directory tree) in the guest."""
        self._require(Operation.FILES)
        _check_guest_path(path)
        with self._crash_guard():
            await self._do_remove(path, recursive)

    # ---- snapshots ----------------------------------------------------------------------
    async def snapshot(
        self, dest: Path, *, kind: SnapshotKind = SnapshotKind.FULL, leave_paused: bool = False,
        shareable: bool = False,
    ) -> VmSnapshot:
        """Write a snapshot of this VM to the new directory ``dest``.

        A full snapshot pauses a running VM while it is taken and resumes it afterwards
        (unless ``leave_paused``), also when the snapshot fails. A checkpoint (the
        workspace directory, env and agent state; see :attr:`checkpoint_workspace`) is
        taken from the running guest without pausing it. ``shareable``: a full snapshot
        that restores share copy-on-write, where the backend can (``shared_memory`` in its
        capabilities; others ignore it): for templates and forks.
        """
        async with self._lifecycle:
            self._require(Operation.SNAPSHOT)
            self._require_capability(
                kind in self.capabilities.snapshot_kinds, f"{kind.value} snapshots",
                f"snapshot:{kind.value}",
            )
            if kind is SnapshotKind.DISK and self._state is not VmState.STOPPED:
                raise InvalidStateError(self._id, "take a disk snapshot", self._state,
                                        [VmState.STOPPED])
            if kind is SnapshotKind.FULL and self._state is VmState.STOPPED:
                raise InvalidStateError(self._id, "take a full snapshot", self._state,
                                        [VmState.RUNNING, VmState.PAUSED])
            was_running = self._state is VmState.RUNNING
            if kind is SnapshotKind.FULL and was_running:
                with self._crash_guard():
                    await self._do_pause()
                self._set_state(VmState.PAUSED)
            try:
                with self._crash_guard():
                    return await self._do_snapshot(dest, kind)
            finally:
                if was_running and not leave_paused and self._state is VmState.PAUSED:
                    with self._crash_guard():
                        await self._do_resume()
                    self._set_state(VmState.RUNNING)

    async def restore(self, snapshot: VmSnapshot, *, paused: bool = False,
                      verify: bool = True) -> None:
        """Bring this (created or stopped) VM to the state captured in ``snapshot``.

        Every blob is verified (unless ``verify`` is False: a capture verified when it was
        taken, restored many times) and the snapshot's compatibility checked before
        anything starts; a corrupted or incompatible snapshot raises before the VM changes.
        """
        async with self._lifecycle:
            self._require(Operation.RESTORE)
            kind = snapshot.manifest.kind
            self._require_capability(
                kind in self.capabilities.snapshot_kinds, f"restore of {kind.value} snapshots",
                f"snapshot:{kind.value}",
            )
            snapshot.manifest.check_restorable(self.host_info())
            if verify:
                snapshot.verify()
            self._set_state(VmState.STARTING)
            await self._run_startup(self._do_restore(snapshot, paused=paused), "restore")
            if paused:
                self._set_state(VmState.PAUSED)
            else:
                self._set_state(VmState.RUNNING)

    def host_info(self) -> HostInfo:
        """What this backend on this host offers, for snapshot compatibility checks."""
        return HostInfo(arch=HostInfo.current_arch(), backend=self.backend_name,
                        backend_version="0")

    # ---- backend hooks ------------------------------------------------------------------
    @abc.abstractmethod
    async def _do_start(self) -> None:
        """Boot; return when the guest agent answers. Raise BootError/VmCrashed on failure."""

    @abc.abstractmethod
    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        """Shut down and release every resource; must be safe to call in any state."""

    async def _do_pause(self) -> None:
        raise UnsupportedOperation(self.backend_name, "pause")

    async def _do_resume(self) -> None:
        raise UnsupportedOperation(self.backend_name, "resume")

    @abc.abstractmethod
    async def _do_exec(self, request: ExecRequest) -> ExecProcess:
        """Start a command and return its process handle."""

    @abc.abstractmethod
    def _do_read_file(self, path: str) -> AsyncIterator[bytes]:
        """Stream a guest file's content."""

    @abc.abstractmethod
    async def _do_write_file(self, path: str, chunks: AsyncIterable[bytes], mode: int) -> None:
        """Write a guest file atomically from chunks."""

    @abc.abstractmethod
    async def _do_list_dir(self, path: str) -> list[FileInfo]:
        """List a guest directory."""

    @abc.abstractmethod
    async def _do_remove(self, path: str, recursive: bool) -> None:
        """Remove a guest path."""

    async def _do_mkdir(self, path: str, mode: int) -> None:
        """Create directory ``path`` (and missing parents); the last one gets ``mode``.

        An existing directory is not an error. The default runs ``mkdir -p`` in the guest;
        backends whose agent can do it directly override this.
        """
        await self._guest_command(path, ["mkdir", "-p", "-m", f"{mode & 0o7777:o}", "--", path])

    async def _do_readlink(self, path: str) -> str:
        """The target of the symbolic link ``path`` (the default runs ``readlink``)."""
        out = await self._guest_command(path, ["readlink", "--", path])
        return out.decode("utf-8", "surrogateescape").removesuffix("\n")

    async def _do_symlink(self, target: str, path: str) -> None:
        """Create the symbolic link ``path`` pointing at ``target`` (never followed).

        The default runs ``ln -s`` in the guest.
        """
        await self._guest_command(path, ["ln", "-s", "--", target, path])

    async def _do_agent_state(self) -> dict[str, Any]:
        """What the guest reports that matters for resuming work, as JSON-ready data.

        Checkpoints carry it as it is; nothing on the host interprets it.
        """
        return {"hostname": self._config.hostname}

    async def _guest_command(self, path: str, argv: list[str]) -> bytes:
        """Run a file utility in the guest for a default hook; GuestFileError if it fails."""
        process = await self._do_exec(ExecRequest(tuple(argv), timeout=60.0))
        await process.close_stdin()
        result = await process.wait()
        if result.exit_code != 0:
            message = result.stderr.decode(errors="replace").strip() or f"{argv[0]} failed"
            code = "ENOSYS" if result.exit_code == 127 else "EIO"
            raise GuestFileError(path, code, f"{' '.join(argv[:2])}: {message}")
        return result.stdout

    async def _do_grow_disk(self, disk_mib: int) -> None:
        """Make the root disk ``disk_mib`` MiB and grow the guest's file system to it."""
        raise UnsupportedOperation(self.backend_name, "grow a root disk")

    async def _do_walk(self, path: str) -> list[TreeEntry]:
        raise UnsupportedOperation(self.backend_name, "walk the guest's file system")

    async def _do_guest_usage(self) -> GuestUsage:
        raise UnsupportedOperation(self.backend_name, "report the guest's usage")

    async def _do_guest_processes(self) -> GuestProcesses:
        raise UnsupportedOperation(self.backend_name, "list the guest's processes")

    async def _do_sweep_processes(self, keep: Collection[int]) -> int:
        raise UnsupportedOperation(self.backend_name, "stop the guest's processes")

    async def _do_mark_tree(self) -> int:
        raise UnsupportedOperation(self.backend_name, "mark the guest's file system")

    async def _do_layer_since(self, mark: int, out: BinaryIO) -> tuple[int, int]:
        raise UnsupportedOperation(self.backend_name, "make a layer in the guest")

    async def _do_detach(self) -> None:
        return None

    async def _do_reattach_exec(self, exec_id: str, offset: int | None) -> ExecProcess:
        raise UnsupportedOperation(self.backend_name, "re-attach to a running command")

    async def _do_snapshot(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        raise UnsupportedOperation(self.backend_name, "snapshot")

    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Bring the VM to the snapshot's state; leave the guest paused if ``paused``."""
        raise UnsupportedOperation(self.backend_name, "restore")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._id} {self._state}>"


async def _single(data: bytes | bytearray | memoryview) -> AsyncIterator[bytes]:
    yield bytes(data)


def _check_guest_path(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError([f"guest path {path!r} must be an absolute path without NUL bytes"],
                          what="guest path")
