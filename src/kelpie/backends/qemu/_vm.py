"""QemuVm: a real micro-VM under QEMU (``microvm`` machine, KVM when proven, else TCG).

Each VM owns one directory (see DESIGN.md): ``qmp.sock``, ``agent.sock`` (QEMU's end of the
virtio-serial agent port), ``console.log``, ``qemu.log`` (QEMU's own stderr), ``qemu.pid``,
``config.json`` and, with a root disk, ``overlay.qcow2`` on top of the read-only base.
QEMU runs in its own session, so it does not die with the process that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from kelpie._paths import vms_dir
from kelpie.backends import _agent_client as agent
from kelpie.backends.qemu import CAPABILITIES
from kelpie.backends.qemu._accel import AccelChoice, choose_accel
from kelpie.backends.qemu._cmdline import QemuLaunch, build_command
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
    StreamName,
    VmConfig,
    VmCrashed,
    VmError,
    VmInstance,
    VmState,
)

T = TypeVar("T")

DEFAULT_BOOT_TIMEOUT = 120.0
"""Seconds from QEMU start to the agent's hello; generous because TCG on a loaded host is slow."""
SHUTDOWN_TIMEOUT = 5.0
QUIT_TIMEOUT = 3.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes including the NUL; keep a margin
CONSOLE_TAIL = 2000


def console_tail(workdir: Path, limit: int = CONSOLE_TAIL) -> str:
    """The last ``limit`` characters of the guest console and QEMU's own log."""
    parts = []
    for name in ("console.log", "qemu.log"):
        with contextlib.suppress(OSError):
            text = (workdir / name).read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {name} ---\n{text[-limit:]}")
    return "\n".join(parts) or "(no console output)"


class QemuProcess(ExecProcess):
    """A command running in a QEMU guest, driven through the agent."""

    def __init__(self, request: ExecRequest, handle: agent.ExecHandle, vm: QemuVm) -> None:
        super().__init__(request)
        self._handle = handle
        self._vm = vm
        self._started = time.monotonic()

    async def write_stdin(self, data: bytes) -> None:
        with self._vm._agent_errors():
            await self._handle.write_stdin(data)

    async def close_stdin(self) -> None:
        with self._vm._agent_errors():
            await self._handle.close_stdin()

    async def send_signal(self, signum: int) -> None:
        with self._vm._agent_errors():
            await self._handle.send_signal(signum, group=True)

    async def resize(self, rows: int, cols: int) -> None:
        with self._vm._agent_errors():
            await self._handle.resize(rows, cols)

    async def _events(self) -> AsyncIterator[ExecEvent]:
        with self._vm._agent_errors():
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
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._qmp: QMPClient | None = None
        self._agent: agent.AgentClient | None = None
        self.agent_info: agent.AgentInfo | None = None
        self.exit_status: int | None = None
        self._stopping = False

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
        if self._process is not None and self._process.returncode is None:
            return self._process.pid
        return None

    def host_info(self) -> HostInfo:
        return HostInfo(
            arch=HostInfo.current_arch(),
            backend=self.backend_name,
            backend_version=_qemu_version(self._qemu_binary()),
            cpu_model="host" if self.accel and self.accel.accel == "kvm" else "max",
            machine="microvm",
            guestkit_digest=self._kit.digest if self._kit else None,
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
        qemu = self._qemu_binary()
        if self._kit is None:
            try:
                self._kit = await asyncio.to_thread(build_guestkit, progress=self._progress)
            except GuestKitError as exc:
                raise BootError(f"cannot prepare the guest kit: {exc}") from exc
        kit = self._kit
        kernel = self.config.kernel or kit.kernel
        initrd = self.config.initrd or kit.initrd
        self.accel = await asyncio.to_thread(choose_accel, qemu, kernel, initrd, kit.digest)
        self._prepare_workdir()
        overlay = await self._prepare_overlay()
        launch = QemuLaunch(
            qemu=qemu, config=self.config, kernel=kernel, initrd=initrd, workdir=self.workdir,
            accel=self.accel.accel, overlay=overlay, hostname=self.config.hostname or
            f"kelpie-{self.id[:8]}",
        )
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

    def _prepare_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("qmp.sock", "agent.sock", "console.log", "qemu.log", "qemu.pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()
        config = {"id": self.id, "backend": self.backend_name, "config": self.config.to_dict()}
        (self.workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    async def _prepare_overlay(self) -> Path | None:
        base = self.config.root_disk
        if base is None:
            return None
        if not base.is_file():
            raise BootError(f"root disk {base} does not exist or is not a file")
        overlay = self.workdir / "overlay.qcow2"
        if overlay.exists():
            return overlay  # the disk persists across stop/start, like a real disk
        fmt = "qcow2" if base.read_bytes()[:4] == b"QFI\xfb" else "raw"
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base.resolve()),
            str(overlay), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        if process.returncode != 0:
            raise BootError(f"cannot create the disk overlay: {err.decode().strip()}")
        return overlay

    async def _spawn(self, command: list[str]) -> None:
        with (self.workdir / "qemu.log").open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # outlives whoever started it; killed as a group
            )
        (self.workdir / "qemu.pid").write_text(f"{self._process.pid}\n")
        self._exited = asyncio.get_running_loop().create_future()
        self._watcher = asyncio.create_task(self._watch(self._process, self._exited))

    async def _watch(
        self, process: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> None:
        status = await process.wait()
        self.exit_status = status
        exited.set_result(status)
        if self._state in (VmState.RUNNING, VmState.PAUSED) and not self._stopping:
            self.mark_crashed(
                f"QEMU exited unexpectedly with status {status}\n{console_tail(self.workdir)}"
            )
            await self._disconnect()

    async def _before_exit(self, step: Awaitable[T], what: str, deadline: float) -> T:
        """Run a boot step unless QEMU exits or the boot deadline passes first."""
        assert self._exited is not None
        task = asyncio.ensure_future(step)
        remaining = max(deadline - time.monotonic(), 0.1)
        waiters: set[asyncio.Future[Any]] = {task, self._exited}
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
        if self._exited.done():
            raise BootError(
                f"VM {self.id}: QEMU exited with status {self._exited.result()} while waiting "
                f"for {what}\n{console_tail(self.workdir)}"
            )
        raise BootError(
            f"VM {self.id}: timed out after {self.boot_timeout:g}s waiting for {what}\n"
            f"{console_tail(self.workdir)}"
        )

    async def _connect_qmp(self) -> QMPClient:
        client = QMPClient(f"kelpie-{self.id}")
        while True:
            try:
                await client.connect(str(self.qmp_socket))
                return client
            except QMPError:
                await asyncio.sleep(0.01)  # QEMU has not created the socket yet

    # ---- stop ---------------------------------------------------------------------------
    async def _do_stop(self, *, force: bool) -> None:
        self._stopping = True
        try:
            await self._shut_down(force)
        finally:
            self._stopping = False

    async def _shut_down(self, force: bool) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            if not force and self._agent is not None and self._state is VmState.RUNNING:
                with contextlib.suppress(agent.AgentError, OSError, TimeoutError):
                    async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                        await self._agent.shutdown(poweroff=True)
                        await process.wait()
            if process.returncode is None and self._qmp is not None:
                with contextlib.suppress(QMPError, OSError, TimeoutError):
                    async with asyncio.timeout(QUIT_TIMEOUT):
                        await self._qmp.execute("quit")
                        await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self._watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._disconnect()
        for name in ("qmp.sock", "agent.sock", "qemu.pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()
        self._process = None

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
            if self._process is None or self._process.returncode is not None:
                raise self._gone(f"QMP {command}") from exc
            raise VmError(f"VM {self.id}: QMP {command} failed: {exc}") from exc

    async def _do_pause(self) -> None:
        await self._qmp_execute("stop")

    async def _do_resume(self) -> None:
        await self._qmp_execute("cont")

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
            if self._process is None or self._process.returncode is not None:
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
        return QemuProcess(request, handle, self)

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


def make_qemu(config: VmConfig, **options: Any) -> QemuVm:
    """Factory hook for the backend registry."""
    return QemuVm(config, **options)
