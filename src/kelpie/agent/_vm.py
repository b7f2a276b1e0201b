"""AgentVm: every guest operation of :class:`~kelpie.vm.VmInstance`, through the guest agent.

A backend whose guest runs the Kelpie agent subclasses :class:`AgentVm` and supplies:

* ``_connect_agent(timeout)``: a new :class:`AgentClient` on a byte stream to the agent (a
  unix socket, a vsock connection...), no hello yet;
* ``_vmm_running()`` and ``_vmm_gone_error(doing)``: whether its VMM still runs, and the
  :class:`VmCrashed` to raise when it does not;
* its VMM lifecycle (``_do_start``, ``_do_stop``, ``_do_pause``, ``_do_resume``) and
  snapshot hooks (``_do_snapshot``, ``_do_restore``), which say hello through
  :attr:`agent` (an :class:`AgentSession`).

Commands, files, re-attaching to commands and the checkpoint hooks are done here, with the
agent client's errors translated into Kelpie's tree. A guest whose agent restarted (the
guest is root and may kill it; its init starts a new one) gets a new hello on the next
call, and the call refused by the new agent is sent again; commands of the old agent end
with an :class:`~kelpie.AgentError` that says so.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from kelpie.agent._client import AgentClient
from kelpie.agent._errors import (
    AgentClientError,
    AgentDisconnected,
    AgentRemoteError,
    AgentRestarted,
)
from kelpie.agent._process import AgentProcess, FinishedProcess
from kelpie.agent._session import AgentSession
from kelpie.agent._types import AgentInfo
from kelpie.vm import (
    AgentError,
    ConfigError,
    ExecError,
    ExecProcess,
    ExecRequest,
    FileInfo,
    GuestFileError,
    GuestProcesses,
    GuestUsage,
    TreeEntry,
    VmConfig,
    VmCrashed,
    VmError,
    VmInstance,
    VmState,
)

T = TypeVar("T")

RESTORE_ENTROPY_BYTES = 64
"""Fresh random bytes a restored guest mixes into its RNG (clones must not share a state)."""
REPLAY_LIMIT = 4 * 1024 * 1024
"""Bytes of an upload kept to send it again if a new agent refuses it (a larger upload
refused that way fails with an AgentError; the next call then goes to the new agent)."""
GROW_FS_TIMEOUT = 10.0
"""How long the guest may take to see its disk's new size (a config interrupt)."""
REPLAY_KEEP = 256 * 1024
"""Bytes of the latest output the guest keeps for a command that keeps running, so that a
re-attach gets again what was in flight when the host changed (e.g. a live teleport)."""


class _Replayable:
    """An upload's chunks, remembered as they are consumed (up to a limit) so that an
    upload a restarted agent refused can be sent again from its first byte."""

    def __init__(self, chunks: AsyncIterable[bytes], limit: int) -> None:
        self._source = aiter(chunks)
        self._seen: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.complete = True
        """Whether every chunk consumed so far is remembered."""

    async def replay(self) -> AsyncIterator[bytes]:
        """The remembered chunks, then the rest of the source."""
        for chunk in list(self._seen):
            yield chunk
        async for chunk in self._source:
            self._size += len(chunk)
            if self._size <= self._limit:
                self._seen.append(chunk)
            else:
                self.complete = False
                self._seen.clear()
            yield chunk


def _read_plan(pending: Path) -> dict[str, Any] | None:
    """A resync plan; None when there is none, empty when it is unreadable."""
    try:
        plan = json.loads(pending.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return plan if isinstance(plan, dict) else {}


class AgentVm(VmInstance):
    """A VM whose guest operations go through the Kelpie guest agent over a byte stream."""

    def __init__(self, config: VmConfig, *, vm_id: str | None = None) -> None:
        super().__init__(config, vm_id=vm_id)
        self.agent = AgentSession(
            self._connect_agent, may_probe=lambda: self._state is VmState.RUNNING
        )
        self._processes: weakref.WeakSet[AgentProcess] = weakref.WeakSet()
        self.replay_limit = REPLAY_LIMIT
        """Bytes of an upload kept to send it again to a restarted agent that refused it."""

    # ---- what the backend supplies ------------------------------------------------------
    @abc.abstractmethod
    async def _connect_agent(self, timeout: float) -> AgentClient:
        """A new connection to the guest agent (no hello yet), within ``timeout`` seconds."""

    @abc.abstractmethod
    def _vmm_running(self) -> bool:
        """Whether the VMM process (and so the guest) still runs."""

    @abc.abstractmethod
    def _vmm_gone_error(self, doing: str) -> VmCrashed:
        """The error for ``doing`` something with a VM whose VMM is not running."""

    # ---- the agent connection -----------------------------------------------------------
    @property
    def agent_info(self) -> AgentInfo | None:
        """The hello of the agent connected now: its pid, host name, and the execs it held
        then (None until it said hello, and once it was replaced, until the next one)."""
        return self.agent.info

    async def _finish_handshake(self, timeout: float) -> None:
        """Say hello to an agent connected while the guest was paused (attach, restore)."""
        if self.agent.client is None or self.agent.ready:
            return
        with self._agent_errors():
            await self.agent.hello(timeout=timeout)

    @staticmethod
    def _plan_resync(pending: Path, hostname: str | None) -> None:
        """Note in ``pending`` (a VM directory's file) that a restored guest must be resynced
        (clock, RNG, and ``hostname`` when it is another VM's image) when it first runs,
        so that a process attaching to a VM left paused by a restore still does it."""
        pending.write_text(json.dumps({"hostname": hostname}) + "\n")

    async def _resync_pending(self, pending: Path) -> None:
        """Resync a restored guest that runs now, as :meth:`_plan_resync` noted: clock, RNG
        (reseeded), host name; then forget the plan. Nothing to do without one."""
        plan = _read_plan(pending)
        if plan is None:
            return
        hostname = plan.get("hostname")
        await self._call(lambda client: client.resync(
            epoch_ns=time.time_ns(), entropy=os.urandom(RESTORE_ENTROPY_BYTES),
            hostname=hostname if isinstance(hostname, str) else None,
        ))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pending)

    def _interrupt_commands(self, reason: str) -> None:
        """End the stream of every running command with ``reason`` (e.g. a restore)."""
        for process in list(self._processes):
            if process.exit is None:
                process.interrupt(reason)
        self._processes.clear()

    # ---- errors -------------------------------------------------------------------------
    def _translate(self, exc: AgentClientError, path: str | None = None) -> VmError:
        """An agent client error as an error of Kelpie's tree."""
        if isinstance(exc, AgentRemoteError):
            if path is not None:
                return GuestFileError(path, exc.code, exc.message)
            return AgentError(f"VM {self.id}: the agent refused {exc.op}: {exc}")
        if isinstance(exc, AgentDisconnected):
            if not self._vmm_running():
                return self._vmm_gone_error("an agent call")
            if isinstance(exc, AgentRestarted):
                return AgentError(f"VM {self.id}: {exc}")
            return AgentError(f"VM {self.id}: lost the guest agent: {exc}")
        return AgentError(f"VM {self.id}: agent error: {exc}")

    @contextlib.contextmanager
    def _agent_errors(self, path: str | None = None) -> Iterator[None]:
        """Translate agent client errors raised in the block into Kelpie's error tree."""
        try:
            yield
        except AgentClientError as exc:
            raise self._translate(exc, path) from exc

    async def _ready_client(self) -> AgentClient:
        """A client that said hello to the agent running now (again, if it restarted)."""
        if self.agent.client is None:
            raise self._vmm_gone_error("an agent call")
        with self._agent_errors():
            return await self.agent.ready_client()

    async def _call(
        self, request: Callable[[AgentClient], Awaitable[T]], path: str | None = None
    ) -> T:
        """``request`` on a ready client; sent once more if a new agent refused it."""
        for attempt in (1, 2):
            client = await self._ready_client()
            try:
                return await request(client)
            except AgentRestarted as exc:
                if not exc.refused or attempt == 2:
                    raise self._translate(exc, path) from exc
            except AgentClientError as exc:
                raise self._translate(exc, path) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- commands -----------------------------------------------------------------------
    async def _do_exec(self, request: ExecRequest) -> ExecProcess:
        async def start(client: AgentClient) -> ExecProcess:
            try:
                # Up-front stdin goes with the command (none: /dev/null), so the agent
                # needs no second message to end it.
                handle = await client.exec(
                    list(request.argv), env=dict(request.env) or None, cwd=request.cwd,
                    user=request.user, stdin=request.stdin or None,
                    stdin_open=request.stdin is None, timeout=request.timeout,
                    pty=request.pty, replay=REPLAY_KEEP if request.keep_running else 0,
                )
            except AgentRemoteError as exc:
                name = request.argv[0]
                missing_cwd = "cwd" in exc.message or "change directory" in exc.message
                if exc.code == "ENOENT" and not missing_cwd:
                    return FinishedProcess(request, 127, f"{name}: command not found")
                if exc.code in ("EACCES", "ENOEXEC"):
                    return FinishedProcess(request, 126, f"{name}: {exc.message}")
                raise ExecError(f"cannot run {name!r}: {exc.message} ({exc.code})") from exc
            process = AgentProcess(request, handle, self._agent_errors)
            process.stdin_taken = request.stdin is not None
            self._processes.add(process)
            return process

        return await self._call(start)

    async def _do_reattach_exec(self, exec_id: str, offset: int | None) -> ExecProcess:
        try:
            number = int(exec_id)
        except ValueError:
            raise ConfigError([f"exec id {exec_id!r} is not one of this backend's (a number)"],
                              what="exec id") from None

        async def attach(client: AgentClient) -> ExecProcess:
            held = {e.exec_id: e for e in (client.info.execs if client.info else ())}
            argv = held[number].argv if number in held and held[number].argv else ("?",)
            try:
                handle = await client.attach(number, offset=offset)
                await handle.close_stdin()
            except AgentRemoteError as exc:
                raise ExecError(f"cannot re-attach to command {exec_id}: {exc.message} "
                                f"({exc.code})") from exc
            process = AgentProcess(ExecRequest(tuple(argv)), handle, self._agent_errors)
            process.exec_id = exec_id
            process.output_offset = handle.offset
            self._processes.add(process)
            return process

        return await self._call(attach)

    # ---- files --------------------------------------------------------------------------
    async def _do_read_file(self, path: str) -> AsyncIterator[bytes]:
        for attempt in (1, 2):
            client = await self._ready_client()
            async with contextlib.aclosing(client.read_file(path)) as chunks:
                try:
                    first = await anext(chunks, None)
                except AgentRestarted as exc:
                    if exc.refused and attempt == 1:
                        continue
                    raise self._translate(exc, path) from exc
                except AgentClientError as exc:
                    raise self._translate(exc, path) from exc
                if first is None:
                    return
                yield first
                with self._agent_errors(path):
                    async for chunk in chunks:
                        yield chunk
                return

    async def _do_write_file(self, path: str, chunks: AsyncIterable[bytes], mode: int) -> None:
        upload = _Replayable(chunks, self.replay_limit)
        for attempt in (1, 2):
            client = await self._ready_client()
            try:
                await client.write_file(path, upload.replay(), mode=mode)
                return
            except AgentRestarted as exc:
                if not (exc.refused and attempt == 1 and upload.complete):
                    raise self._translate(exc, path) from exc
            except AgentClientError as exc:
                raise self._translate(exc, path) from exc

    async def _do_list_dir(self, path: str) -> list[FileInfo]:
        entries = await self._call(lambda client: client.list_dir(path), path)
        return [FileInfo(e.name, e.type, e.size, e.mode) for e in entries]

    async def _do_remove(self, path: str, recursive: bool) -> None:
        await self._call(lambda client: client.remove(path, recursive=recursive), path)

    async def _do_mkdir(self, path: str, mode: int) -> None:
        await self._call(lambda client: client.mkdir(path, parents=True, mode=mode), path)

    async def _do_readlink(self, path: str) -> str:
        info = await self._call(lambda client: client.stat(path, follow_symlinks=False), path)
        if info.target is None:
            raise GuestFileError(path, "EINVAL", f"not a symbolic link (a {info.type})")
        return info.target

    async def _do_guest_usage(self) -> GuestUsage:
        return await self._call(lambda client: client.usage())

    async def _do_walk(self, path: str) -> list[TreeEntry]:
        return await self._call(lambda client: client.walk(path), path)

    async def _grow_guest_fs(self, size: int) -> None:
        """Grow the guest's root file system to ``size`` bytes, once its kernel has seen
        the disk that big (the host's resize reaches it as an interrupt, handled later)."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + GROW_FS_TIMEOUT, 0.005
        while True:
            client = await self._ready_client()
            try:
                await client.grow_fs(size)
                return
            except AgentRemoteError as exc:
                if exc.code != "EAGAIN" or loop.time() >= deadline:
                    raise self._translate(exc) from exc
            except AgentClientError as exc:
                raise self._translate(exc) from exc
            await asyncio.sleep(delay)  # no event tells the host the guest saw the size
            delay = min(delay * 2, 0.2)

    async def _do_guest_processes(self) -> GuestProcesses:
        return await self._call(lambda client: client.processes())

    async def _do_sweep_processes(self, keep: Collection[int]) -> int:
        return await self._call(lambda client: client.sweep(keep))

    async def _do_mark_tree(self) -> int:
        return await self._call(lambda client: client.mark())

    async def _do_layer_since(self, mark: int, out: BinaryIO) -> tuple[int, int]:
        return await self._call(lambda client: client.layer(mark, out))

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

    async def _agent_poweroff(self) -> None:
        """Ask the agent to power the guest off (a graceful stop)."""
        client = self.agent.client
        if client is not None:
            await client.shutdown(poweroff=True)
