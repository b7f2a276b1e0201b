"""E2B's ``process.Process`` service, served host-side over Kelpie's exec: commands started
through it outlive the RPC that started them (E2B's background commands), others follow
them by pid, and their lifetime is bounded by the caller's Connect deadline as envd does."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from kelpie.e2b._caller import Caller
from kelpie.e2b._proto.process import process_pb as pb
from kelpie.e2b._proto.process.process_connect import Process
from kelpie.runtime import Runtime
from kelpie.vm import ExecExit, ExecOutput, ExecProcess, KelpieError

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

Event = pb.ProcessEvent
KEEPALIVE_DEFAULT_S = 50.0
"""How long a stream stays silent before a keep-alive (the SDK asks for 50 s)."""
SIGNALS = {pb.Signal.SIGKILL: signal.SIGKILL, pb.Signal.SIGTERM: signal.SIGTERM}
ENDED_KEPT = 64
"""Ended commands kept per sandbox for a late Connect to get their end."""


@dataclasses.dataclass(eq=False)
class Command:
    """One command started through the service: its process and who follows its events."""

    pid: int
    config: pb.ProcessConfig
    tag: str | None
    pty: bool
    process: ExecProcess | None = None
    listeners: set[asyncio.Queue[Event]] = dataclasses.field(default_factory=set)
    end: Event | None = None
    task: asyncio.Task[None] | None = None

    def publish(self, event: Event) -> None:
        for queue in self.listeners:
            queue.put_nowait(event)


class Commands:
    """The commands each sandbox runs through E2B's process service, by pid."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._by_sandbox: dict[str, dict[int, Command]] = {}
        self._next_pid = 1

    def running(self, sandbox_id: str) -> list[Command]:
        return [c for c in self._by_sandbox.get(sandbox_id, {}).values() if c.end is None]

    def find(self, sandbox_id: str, selector: pb.ProcessSelector) -> Command:
        """The command ``selector`` names (by pid or tag); NOT_FOUND if none runs."""
        chosen = selector.selector
        for command in self._by_sandbox.get(sandbox_id, {}).values():
            if chosen is not None and ((chosen.field == "pid" and command.pid == chosen.value)
                                       or (chosen.field == "tag" and command.tag == chosen.value)):
                return command
        what = "no process selected" if chosen is None else f"process {chosen.field} " \
            f"{chosen.value!r} not found"
        raise ConnectError(Code.NOT_FOUND, what)

    async def start(self, caller: Caller, request: pb.StartRequest,
                    first: asyncio.Queue[Event]) -> Command:
        """Start the command ``request`` describes; ``first`` follows it from its start."""
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is empty: name a program")
        pty = request.pty is not None
        env = dict(config.envs)
        if pty:
            env = {"TERM": "xterm-256color", **env}
        cwd = config.cwd if config.has_field("cwd") and config.cwd else None
        started: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        command = Command(pid=0, config=config, tag=request.tag if request.has_field("tag")
                          else None, pty=pty)
        command.listeners.add(first)
        command.task = asyncio.create_task(
            self._run(caller, command, [config.cmd, *config.args], env,
                      cwd or caller.home, request, started),
            name=f"kelpie-e2b-process-{caller.sandbox_id}")
        return await started

    async def _run(self, caller: Caller, command: Command, argv: list[str],
                   env: dict[str, str], cwd: str, request: pb.StartRequest,
                   started: asyncio.Future[Command]) -> None:
        sandbox = caller.sandbox_id
        try:
            async with self._runtime.exec_stream(sandbox, argv, env=env, cwd=cwd,
                                                 user=caller.user,
                                                 pty=command.pty) as process:
                command.process = process
                command.pid = process.pid if process.pid is not None else self._fresh_pid()
                self._by_sandbox.setdefault(sandbox, {})[command.pid] = command
                if request.has_field("stdin") and not request.stdin and not command.pty:
                    await process.close_stdin()  # unset: kept open, as envd does
                if command.pty and request.pty is not None and request.pty.size is not None:
                    with contextlib.suppress(KelpieError):
                        await process.resize(request.pty.size.rows or 24,
                                             request.pty.size.cols or 80)
                command.publish(_event("start", Event.StartEvent(pid=command.pid)))
                started.set_result(command)
                async for item in process:
                    if isinstance(item, ExecOutput):
                        stream = "pty" if command.pty else item.stream.value
                        command.publish(_event("data", Event.DataEvent(
                            output=Oneof(stream, item.data))))  # type: ignore[arg-type]
                    elif isinstance(item, ExecExit):
                        command.end = _end(item)
        except KelpieError as exc:
            if not started.done():
                started.set_exception(ConnectError(Code.INVALID_ARGUMENT,
                                                   f"cannot start {argv[0]!r}: {exc}"))
                return
            command.end = _event("end", Event.EndEvent(
                exit_code=-1, exited=False, status="unknown", error=str(exc)))
        finally:
            if not started.done():
                started.cancel()
            if command.end is None:
                command.end = _event("end", Event.EndEvent(
                    exit_code=-1, exited=False, status="signal: killed",
                    error="the sandbox stopped"))
            command.publish(command.end)
            self._forget_ended(sandbox)

    def _fresh_pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def _forget_ended(self, sandbox_id: str) -> None:
        """Keep the latest ended commands of a sandbox; none once the sandbox is gone."""
        try:
            gone = self._runtime.db.get(sandbox_id) is None
        except KelpieError:  # the runtime closed: the daemon is going
            gone = True
        if gone:
            if not self.running(sandbox_id):
                self._by_sandbox.pop(sandbox_id, None)
            return
        commands = self._by_sandbox.get(sandbox_id, {})
        ended = [pid for pid, c in commands.items() if c.end is not None]
        for pid in ended[:max(0, len(ended) - ENDED_KEPT)]:
            del commands[pid]

    def forget_sandbox(self, sandbox_id: str) -> None:
        for command in self._by_sandbox.pop(sandbox_id, {}).values():
            if command.task is not None:
                command.task.cancel()


def _event(field: Literal["start", "data", "end", "keepalive"], value: Any) -> Event:
    return Event(event=Oneof(field, value))  # type: ignore[arg-type]


def _end(exit: ExecExit) -> Event:
    """envd's end event: exit code -1 and a signal status when a signal killed it."""
    if exit.signal:
        try:
            name = signal.strsignal(exit.signal) or str(exit.signal)
        except ValueError:
            name = str(exit.signal)
        status = f"signal: {name.lower()}"
        return _event("end", Event.EndEvent(exit_code=-1, exited=False, status=status,
                                            error=status))
    status = f"exit status {exit.exit_code}"
    return _event("end", Event.EndEvent(
        exit_code=exit.exit_code, exited=True, status=status,
        error=status if exit.exit_code else None))


async def follow(command: Command, queue: asyncio.Queue[Event],
                 keepalive: float) -> AsyncIterator[Event]:
    """The command's events from ``queue`` until its end, with a keep-alive after each
    ``keepalive`` seconds of silence (a client that went away is noticed at a send)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), keepalive)
            except TimeoutError:
                yield _event("keepalive", Event.KeepAlive())
                continue
            yield event
            if event.event is not None and event.event.field == "end":
                return
    finally:
        command.listeners.discard(queue)


class ProcessService(Process):
    """``process.Process``: start, follow, list, feed and signal commands in a sandbox."""

    def __init__(self, commands: Commands, caller: Callable[[Any], Caller]) -> None:
        self._commands = commands
        self._caller = caller

    async def start(
        self, request: pb.StartRequest,
        ctx: RequestContext[pb.StartRequest, pb.StartResponse], /,
    ) -> AsyncIterator[pb.StartResponse]:
        caller = self._caller(ctx)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        command = await self._commands.start(caller, request, queue)
        deadline = _deadline(ctx)
        killer = None if deadline is None else asyncio.get_running_loop().call_later(
            deadline, lambda: asyncio.ensure_future(_kill(command)))
        try:
            async for event in follow(command, queue, _keepalive(ctx)):
                yield pb.StartResponse(event=event)
        finally:  # a caller that went away leaves the command to its deadline (as envd)
            if killer is not None and command.end is not None:
                killer.cancel()

    async def connect(
        self, request: pb.ConnectRequest,
        ctx: RequestContext[pb.ConnectRequest, pb.ConnectResponse], /,
    ) -> AsyncIterator[pb.ConnectResponse]:
        caller = self._caller(ctx)
        command = self._commands.find(caller.sandbox_id, request.process or pb.ProcessSelector())
        queue: asyncio.Queue[Event] = asyncio.Queue()
        queue.put_nowait(_event("start", Event.StartEvent(pid=command.pid)))
        if command.end is not None:
            queue.put_nowait(command.end)
        else:
            command.listeners.add(queue)
        async for event in follow(command, queue, _keepalive(ctx)):
            yield pb.ConnectResponse(event=event)

    async def list(self, request: pb.ListRequest,
                   ctx: RequestContext[pb.ListRequest, pb.ListResponse], /) -> pb.ListResponse:
        caller = self._caller(ctx)
        return pb.ListResponse(processes=[
            pb.ProcessInfo(config=c.config, pid=c.pid, tag=c.tag)
            for c in self._commands.running(caller.sandbox_id)])

    async def send_input(
        self, request: pb.SendInputRequest,
        ctx: RequestContext[pb.SendInputRequest, pb.SendInputResponse], /,
    ) -> pb.SendInputResponse:
        command = self._running(ctx, request.process)
        await _write(command, request.input)
        return pb.SendInputResponse()

    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest],
        ctx: RequestContext[pb.StreamInputRequest, pb.StreamInputResponse], /,
    ) -> pb.StreamInputResponse:
        command: Command | None = None
        async for message in request:
            chosen = message.event
            if chosen is None or chosen.field == "keepalive":
                continue
            if chosen.field == "start":
                command = self._running(ctx, chosen.value.process)
            elif command is None:
                raise ConnectError(Code.INVALID_ARGUMENT,
                                   "the input stream must start with a start event")
            else:
                await _write(command, chosen.value.input)
        return pb.StreamInputResponse()

    async def send_signal(
        self, request: pb.SendSignalRequest,
        ctx: RequestContext[pb.SendSignalRequest, pb.SendSignalResponse], /,
    ) -> pb.SendSignalResponse:
        command = self._running(ctx, request.process)
        signum = SIGNALS.get(request.signal)
        if signum is None:
            raise ConnectError(Code.INVALID_ARGUMENT,
                               f"signal {request.signal!r} is not SIGTERM or SIGKILL")
        assert command.process is not None
        await _guarded(command.process.send_signal(signum))
        return pb.SendSignalResponse()

    async def close_stdin(
        self, request: pb.CloseStdinRequest,
        ctx: RequestContext[pb.CloseStdinRequest, pb.CloseStdinResponse], /,
    ) -> pb.CloseStdinResponse:
        command = self._running(ctx, request.process)
        if command.pty:
            raise ConnectError(Code.FAILED_PRECONDITION,
                               "a terminal has no stdin to close: send Ctrl+D (0x04)")
        assert command.process is not None
        await _guarded(command.process.close_stdin())
        return pb.CloseStdinResponse()

    async def update(self, request: pb.UpdateRequest,
                     ctx: RequestContext[pb.UpdateRequest, pb.UpdateResponse], /,
                     ) -> pb.UpdateResponse:
        command = self._running(ctx, request.process)
        if request.pty is not None and request.pty.size is not None:
            if not command.pty:
                raise ConnectError(Code.FAILED_PRECONDITION,
                                   f"process {command.pid} has no terminal to resize")
            assert command.process is not None
            await _guarded(command.process.resize(request.pty.size.rows, request.pty.size.cols))
        return pb.UpdateResponse()

    def _running(self, ctx: Any, selector: pb.ProcessSelector | None) -> Command:
        caller = self._caller(ctx)
        command = self._commands.find(caller.sandbox_id, selector or pb.ProcessSelector())
        if command.end is not None or command.process is None:
            raise ConnectError(Code.NOT_FOUND, f"process {command.pid} has ended")
        return command


async def _write(command: Command, given: pb.ProcessInput | None) -> None:
    if given is None or given.input is None:
        return
    assert command.process is not None
    await _guarded(command.process.write_stdin(given.input.value))


async def _guarded(call: Any) -> None:
    try:
        await call
    except KelpieError as exc:
        raise ConnectError(Code.FAILED_PRECONDITION, str(exc)) from exc


async def _kill(command: Command) -> None:
    """The caller's deadline passed: envd ends the command with it."""
    if command.end is None and command.process is not None:
        with contextlib.suppress(KelpieError):
            await command.process.send_signal(signal.SIGKILL)


def _deadline(ctx: Any) -> float | None:
    remaining = ctx.timeout_ms
    return None if remaining is None else max(remaining / 1000, 0.0)


def _keepalive(ctx: Any) -> float:
    value = ctx.request_headers.get("keepalive-ping-interval")
    try:
        seconds = float(value) if value else KEEPALIVE_DEFAULT_S
    except ValueError:
        seconds = KEEPALIVE_DEFAULT_S
    return min(max(seconds, 1.0), 3600.0)
