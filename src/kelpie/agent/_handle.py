"""One request's frames (:class:`Pending`) and a running command's handle (:class:`ExecHandle`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from kelpie import protocol
from kelpie.agent._errors import (
    AgentClientError,
    AgentDisconnected,
    AgentProtocolError,
    AgentRemoteError,
    AgentRestarted,
)
from kelpie.agent._types import ExitStatus, HandleEvent
from kelpie.protocol import FrameType

if TYPE_CHECKING:
    from kelpie.agent._connection import AgentConnection


class Pending:
    """The frames received for one open request."""

    def __init__(self, op: str, request_id: int) -> None:
        self.op = op
        self.request_id = request_id
        self.queue: asyncio.Queue[protocol.Frame | AgentClientError] = asyncio.Queue()

    async def next(self) -> protocol.Frame:
        """The next frame; raises AgentDisconnected if the stream ended first."""
        item = await self.queue.get()
        if isinstance(item, AgentClientError):
            self.queue.put_nowait(item)  # later calls fail the same way
            raise item
        return item

    def remote_error(self, frame: protocol.Frame) -> AgentRemoteError:
        """Turn an ERROR frame into an exception."""
        body = decode(frame)
        return AgentRemoteError(self.op, str(body.get("code", "EIO")), str(body.get("message")))

    async def reply(self) -> dict[str, Any]:
        """Wait for the terminal frame, skipping events; return the REPLY body."""
        while True:
            frame = await self.next()
            if frame.ftype == FrameType.REPLY:
                return decode(frame)
            if frame.ftype == FrameType.ERROR:
                raise self.remote_error(frame)
            if frame.ftype != FrameType.EVENT:
                raise AgentProtocolError(
                    f"{self.op}: unexpected {FrameType.name(frame.ftype)} frame"
                )


def decode(frame: protocol.Frame) -> dict[str, Any]:
    try:
        return frame.json()
    except protocol.ProtocolError as exc:
        raise AgentProtocolError(f"agent sent a malformed message: {exc.message}") from None


def exit_status(body: dict[str, Any]) -> ExitStatus:
    return ExitStatus(
        exit_code=body.get("exit_code"),
        signal=body.get("signal"),
        timed_out=bool(body.get("timed_out")),
    )


class ExecHandle:
    """A running command: stdin in, events out.

    Iterate it (``async for kind, data in handle``) for ``("stdout", bytes)``,
    ``("stderr", bytes)`` and finally ``("exit", ExitStatus)``; or call ``wait()``
    (discards output).
    """

    def __init__(
        self,
        client: AgentConnection,
        pending: Pending,
        *,
        exec_id: int,
        pid: int,
        stdin_open: bool,
        offset: int | None = None,
    ) -> None:
        self._client = client
        self._pending = pending
        self.exec_id = exec_id
        self.pid = pid
        self.offset = offset
        """Bytes of output the command had produced before the first one this handle
        yields (None: the agent does not say)."""
        self._stdin_open = stdin_open
        self.result: ExitStatus | None = None

    @property
    def request_id(self) -> int:
        """The request id this exec's frames travel on."""
        return self._pending.request_id

    async def write_stdin(self, data: bytes) -> None:
        """Send bytes to the command's stdin (or PTY)."""
        if not self._stdin_open:
            raise AgentProtocolError(
                f"stdin of exec {self.exec_id} is closed (pass stdin_open=True to keep it open)"
            )
        for chunk in split(data):
            await self._client._send(protocol.encode_frame(FrameType.STDIN, self.request_id, chunk))

    async def close_stdin(self) -> None:
        """Send EOF (for a PTY: the terminal's EOF character)."""
        if self._stdin_open:
            self._stdin_open = False
            await self._client._send(protocol.encode_frame(FrameType.STDIN, self.request_id))

    async def send_signal(self, signum: int, *, group: bool = False) -> None:
        """Signal the command (``group=True``: its whole process group)."""
        await self._client._call("signal", target=self.request_id, signum=signum, group=group)

    async def resize(self, rows: int, cols: int) -> None:
        """Change the PTY window size (the command gets SIGWINCH)."""
        await self._client._call("resize", target=self.request_id, rows=rows, cols=cols)

    async def kill(self) -> None:
        """SIGKILL the command's process group; the exit event still follows."""
        await self._client._call("cancel", target=self.request_id)

    def __aiter__(self) -> ExecHandle:
        return self

    async def __anext__(self) -> HandleEvent:
        if self.result is not None:
            raise StopAsyncIteration
        while True:
            try:
                frame = await self._pending.next()
            except AgentRestarted as exc:
                raise AgentRestarted(
                    f"the guest agent restarted while exec {self.exec_id} (pid {self.pid}) "
                    f"ran: its output and exit status are lost with the old agent, and the "
                    f"command may still run in the guest ({exc})"
                ) from exc
            except AgentDisconnected as exc:
                raise AgentDisconnected(
                    f"lost the agent connection while exec {self.exec_id} (pid {self.pid}) "
                    f"was running; it keeps running in the guest: reconnect and "
                    f"attach({self.exec_id}) to collect it ({exc})"
                ) from exc
            if frame.ftype == FrameType.STDOUT:
                return ("stdout", frame.payload)
            if frame.ftype == FrameType.STDERR:
                return ("stderr", frame.payload)
            if frame.ftype == FrameType.REPLY:
                self.result = exit_status(decode(frame))
                self._stdin_open = False
                return ("exit", self.result)
            if frame.ftype == FrameType.ERROR:
                raise self._pending.remote_error(frame)
            # EVENT frames carry nothing an exec consumer needs.

    async def wait(self) -> ExitStatus:
        """Wait for the exit, discarding remaining output."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


def split(data: bytes) -> Iterable[bytes]:
    """Split data into frame-sized, non-empty chunks (empty means EOF on the wire)."""
    view = memoryview(data)
    for start in range(0, len(view), protocol.MAX_FRAME_PAYLOAD):
        yield bytes(view[start : start + protocol.MAX_FRAME_PAYLOAD])


async def chunks(data: bytes | AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        for chunk in split(bytes(data)):
            yield chunk
    elif isinstance(data, AsyncIterable):
        async for piece in data:
            for chunk in split(piece):
                yield chunk
    else:
        for piece in data:
            for chunk in split(piece):
                yield chunk
