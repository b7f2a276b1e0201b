"""AgentVm and AgentSession against an in-process fake agent: no VM, no guest.

The fake speaks :mod:`kelpie.protocol` like the guest agent does where it matters here:
hello opens a session, any other request before it is refused with ``EPROTO: send hello
first``, ``echo`` commands print and exit, ``sleep`` commands run until the agent dies.
"Restarting" it keeps the stream (as virtio-serial does when the guest's init starts a new
agent) but forgets the session and every request; "dropping" it closes the stream (as a
vsock connection ends with its agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import kelpie.agent
from kelpie import protocol
from kelpie.agent import AgentClient, AgentRestarted, AgentSession, AgentVm
from kelpie.agent._tasks import cancel_and_wait
from kelpie.protocol import FrameType
from kelpie.vm import AgentError, VmConfig, VmCrashed, VmState

_PIDS = itertools.count(100)


class FakeAgent:
    """One fake guest agent at a time behind a unix socket; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = next(_PIDS)
        self.session = False
        self.answering = True
        self.greeting = True
        self.requests: list[str] = []
        self.uploads: dict[int, bytearray] = {}
        self.files: dict[int, bytes] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeAgent:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        if self._writer is not None:
            self._writer.close()

    def restart(self, *, answering: bool = True, greeting: bool = True) -> None:
        """A new agent on the same stream: no session, the old one's requests gone.

        ``answering=False``: nothing answers any more (the agent died, no new one came);
        ``greeting=False``: the new agent refuses requests but never answers a hello.
        """
        self.pid = next(_PIDS)
        self.session = False
        self.uploads.clear()
        self.answering = answering
        self.greeting = greeting

    def drop(self) -> None:
        """The agent dies and its stream ends; the next connection meets a new agent."""
        self.restart()
        if self._writer is not None:
            self._writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        decoder = protocol.FrameDecoder()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                decoder.feed(data)
                for frame in decoder.frames():
                    if not isinstance(frame, protocol.Frame):
                        continue
                    if frame.ftype == FrameType.REQUEST:
                        self._request(writer, frame.request_id, frame.json())
                    elif frame.ftype == FrameType.FILE_DATA:
                        self._file_data(writer, frame.request_id, frame.payload)
                await writer.drain()

    def _request(self, writer: asyncio.StreamWriter, rid: int, body: dict[str, Any]) -> None:
        op = str(body["op"])
        self.requests.append(op)
        if not self.answering:
            return
        if op != "hello" and not self.session:
            self._send(writer, FrameType.ERROR, rid, {
                "code": "EPROTO", "message": f"{op}: send hello first to open a session"})
        elif op == "hello" and self.greeting:
            self.session = True
            self._send(writer, FrameType.REPLY, rid, {
                "version": protocol.PROTOCOL_VERSION, "agent_pid": self.pid, "boot_id": "b",
                "hostname": "fake", "root": "/", "time_ns": 0, "execs": []})
        elif op == "exec":
            self._send(writer, FrameType.EVENT, rid,
                       {"event": "started", "exec_id": rid, "pid": rid})
            argv = body["argv"]
            if argv[0] == "echo":
                writer.write(protocol.encode_frame(
                    FrameType.STDOUT, rid, " ".join(argv[1:]).encode() + b"\n"))
                self._send(writer, FrameType.REPLY, rid,
                           {"exit_code": 0, "signal": None, "timed_out": False})
        elif op == "write_file" and self.session:
            self.uploads[rid] = bytearray()
        elif op in ("ping", "mkdir", "shutdown") and self.session:
            self._send(writer, FrameType.REPLY, rid, {"time_ns": 0})
        # anything else (signal, cancel of a sleep...) is left unanswered, like a slow agent

    def _file_data(self, writer: asyncio.StreamWriter, rid: int, data: bytes) -> None:
        upload = self.uploads.get(rid)
        if upload is None:
            return  # refused, or of an agent that restarted since
        if data:
            upload += data
            return
        self.files[rid] = bytes(self.uploads.pop(rid))
        self._send(writer, FrameType.REPLY, rid, {"size": len(self.files[rid])})

    @staticmethod
    def _send(writer: asyncio.StreamWriter, ftype: int, rid: int, body: dict[str, Any]) -> None:
        writer.write(protocol.encode_json(ftype, rid, body))


class FakeVm(AgentVm):
    """An AgentVm whose "VMM" is the fake agent's socket."""

    backend_name = "fake"

    def __init__(self, socket: Path, *, return_timeout: float = 60.0,
                 probe_interval: float = 3600.0) -> None:
        super().__init__(VmConfig())
        self.socket = socket
        self.agent = AgentSession(self._connect_agent,
                                  may_probe=lambda: self.state is VmState.RUNNING,
                                  return_timeout=return_timeout, probe_interval=probe_interval)
        self.vmm_running = True

    async def _connect_agent(self, timeout: float) -> AgentClient:
        return await AgentClient.connect_unix(str(self.socket), timeout=timeout)

    def _vmm_running(self) -> bool:
        return self.vmm_running

    def _vmm_gone_error(self, doing: str) -> VmCrashed:
        return VmCrashed(f"the fake VMM is gone during {doing}")

    async def _do_start(self) -> None:
        await self.agent.connect(5.0)
        await self.agent.hello()

    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        await self.agent.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[FakeAgent]:
    async with FakeAgent(tmp_path / "agent.sock") as fake:
        yield fake


@contextlib.asynccontextmanager
async def running(vm: FakeVm) -> AsyncIterator[FakeVm]:
    await vm.start()
    try:
        yield vm
    finally:
        await vm.stop()


async def test_a_restarted_agent_gets_a_new_hello_and_the_refused_exec_runs(
    agent: FakeAgent,
) -> None:
    async with running(FakeVm(agent.path)) as vm:
        assert (await vm.exec(["echo", "one"])).stdout == b"one\n"
        first = vm.agent_info
        agent.restart()
        assert (await vm.exec(["echo", "two"])).stdout == b"two\n"
        assert first is not None and vm.agent_info is not None
        assert vm.agent_info.agent_pid == agent.pid != first.agent_pid
        assert vm.agent.restarts == 1
        assert agent.requests[-4:] == ["exec", "exec", "hello", "exec"]  # refused, then again


async def test_agent_info_is_the_new_agents_after_a_re_hello(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path)) as vm:
        old = vm.agent_info
        client = vm.agent.client
        assert old is not None and client is not None
        agent.restart()
        with pytest.raises(AgentRestarted):
            await client.ping()  # the connection learns that its agent was replaced
        assert vm.agent_info is None  # no longer the old agent's pid and execs
        await client.hello()  # a re-hello on the connection itself, not through the session
        assert vm.agent_info is not None
        assert vm.agent_info.agent_pid == agent.pid != old.agent_pid


async def test_cancel_and_wait_keeps_the_callers_cancellation() -> None:
    started = asyncio.Event()
    cleaning = asyncio.Event()
    finish = asyncio.Event()

    async def slow_to_cancel() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await finish.wait()  # clean-up that outlasts the caller's cancellation

    task = asyncio.create_task(slow_to_cancel())
    await started.wait()
    caller = asyncio.create_task(cancel_and_wait(task))
    await cleaning.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert caller.cancelled() and not task.done()
    finish.set()
    await asyncio.wait({task})
    assert task.cancelled()


async def test_an_upload_refused_by_a_new_agent_is_sent_again(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path)) as vm:
        agent.restart()
        await vm.write_file("/f", b"whole")
        assert list(agent.files.values()) == [b"whole"]
        assert agent.requests[-3:] == ["write_file", "hello", "write_file"]


async def test_an_upload_too_big_to_keep_fails_when_refused(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path)) as vm:
        vm.replay_limit = 4
        agent.restart()
        with pytest.raises(AgentError, match="replaced by a new one"):
            await vm.write_file("/f", b"whole")
        await vm.write_file("/f", b"again")  # the new agent has its hello by now
        assert list(agent.files.values()) == [b"again"]


async def test_a_command_of_the_dead_agent_ends_with_an_agent_error(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path)) as vm, \
            vm.exec_stream(["sleep", "600"], keep_running=True) as old:
        agent.restart()
        assert (await vm.exec(["echo", "after"])).stdout == b"after\n"
        with pytest.raises(AgentError, match="restarted while exec") as info:
            await old.wait()
        assert not isinstance(info.value, VmCrashed)


async def test_the_probe_notices_a_restart_while_a_command_waits(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path, probe_interval=0.001)) as vm, \
            vm.exec_stream(["sleep", "600"], keep_running=True) as old:
        agent.restart()  # no other call: only the probe's ping can meet the new agent
        with pytest.raises(AgentError, match="replaced by a new one"):
            await old.wait()
        assert (await vm.exec(["echo", "fine"])).stdout == b"fine\n"


async def test_a_dropped_connection_is_opened_again(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path)) as vm:
        assert vm.agent.client is not None
        agent.drop()
        await vm.agent.client.wait_closed()  # seen: a request now goes to a new connection
        assert (await vm.exec(["echo", "back"])).stdout == b"back\n"
        assert vm.agent_info is not None and vm.agent_info.agent_pid == agent.pid


async def test_an_agent_that_does_not_come_back_is_reported_lost(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path, return_timeout=0.05)) as vm:
        agent.restart(greeting=False)
        with pytest.raises(AgentError, match="did not answer a new hello") as info:
            await vm.exec(["echo", "x"])
        assert "lost" in str(info.value) and not isinstance(info.value, VmCrashed)


async def test_a_silent_agent_is_given_up_by_the_probe(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path, return_timeout=0.05, probe_interval=0.001)) as vm:
        agent.restart(answering=False)  # the agent died and none came back
        with pytest.raises(AgentError, match="did not answer a ping") as info:
            await vm.exec(["echo", "x"])
        assert "lost" in str(info.value) and not isinstance(info.value, VmCrashed)


async def test_calls_after_the_vmm_died_are_vm_crashed(agent: FakeAgent) -> None:
    async with running(FakeVm(agent.path)) as vm:
        vm.vmm_running = False
        agent.drop()
        with pytest.raises(VmCrashed, match="fake VMM is gone"):
            await vm.mkdir("/x")


def test_agent_all_matches_public_names() -> None:
    public = {name for name in vars(kelpie.agent) if not name.startswith("_")
              and not isinstance(getattr(kelpie.agent, name), type(kelpie))}
    assert set(kelpie.agent.__all__) == public  # sorted: ruff RUF022
