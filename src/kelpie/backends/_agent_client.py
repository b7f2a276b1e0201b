"""Asyncio client for the Kelpie guest agent (host side of ``kelpie.protocol``).

One ``AgentClient`` owns one byte stream to one agent (a QEMU virtio-serial
chardev socket, a vsock connection, or the agent's own unix socket in test
mode). A single reader task decodes frames and hands each to the queue of
the request it belongs to, so any number of requests (execs, transfers,
file ops) run concurrently over the one stream.

Lifecycle (``ClientState``)::

    connect_unix()/from_streams() --> CONNECTED --hello()--> READY
             every state --close() or the stream ends--> CLOSED

Errors (all subclasses of ``AgentError``; the runtime maps them into
Kelpie's error tree)::

    AgentError
     +-- AgentConnectError      the agent socket could not be reached in time
     +-- AgentDisconnected      the stream ended; every pending request fails
     +-- AgentProtocolError     the peer broke the protocol, or misuse
     |    +-- AgentVersionError
     +-- AgentRemoteError       the agent refused a request (.code: "ENOENT"...)

``asyncio.CancelledError`` is never wrapped or swallowed. Output and file
chunks are queued without bound until consumed: read your exec streams and
downloads (the agent in turn pauses a command whose output the host does not
drain from the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from kelpie import protocol
from kelpie.protocol import FrameType

__all__ = [
    "AgentClient",
    "AgentConnectError",
    "AgentDisconnected",
    "AgentError",
    "AgentInfo",
    "AgentProtocolError",
    "AgentRemoteError",
    "AgentVersionError",
    "ClientState",
    "DirEntry",
    "ExecEvent",
    "ExecHandle",
    "ExecInfo",
    "ExecOutput",
    "ExecResult",
    "FileStat",
    "ResyncResult",
]

logger = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class AgentError(Exception):
    """Base class of every error raised by the agent client."""


class AgentConnectError(AgentError):
    """The agent's socket could not be connected to (or did not answer) in time."""


class AgentDisconnected(AgentError):
    """The connection to the agent ended; the request's outcome is unknown."""


class AgentProtocolError(AgentError):
    """The agent sent something the protocol does not allow, or the client was misused."""


class AgentVersionError(AgentProtocolError):
    """Host and guest agent speak different protocol versions."""


class AgentRemoteError(AgentError):
    """The agent refused or failed a request.

    ``code`` is an errno-style name (``ENOENT``, ``EACCES``, ``EISDIR``...,
    or ``EPROTO`` for a malformed request), ``message`` the agent's words.
    """

    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class ClientState(enum.Enum):
    """Where an AgentClient is in its lifecycle."""

    CONNECTED = "connected"  # stream open, hello() not yet done
    READY = "ready"  # hello() succeeded: requests allowed
    CLOSED = "closed"  # closed by us or lost; terminal


@dataclass(frozen=True)
class ExecInfo:
    """An exec the agent still holds (listed by hello)."""

    exec_id: int
    pid: int
    argv: tuple[str, ...]
    pty: bool
    running: bool


@dataclass(frozen=True)
class AgentInfo:
    """The agent's hello reply."""

    version: int
    agent_pid: int
    boot_id: str
    hostname: str
    root: str
    time_ns: int
    execs: tuple[ExecInfo, ...]


@dataclass(frozen=True)
class ExecResult:
    """How a command ended."""

    exit_code: int | None  # None when killed by a signal
    signal: int | None
    timed_out: bool

    @property
    def returncode(self) -> int:
        """subprocess-style: the exit code, or minus the signal number."""
        if self.exit_code is not None:
            return self.exit_code
        return -(self.signal or 0)


@dataclass(frozen=True)
class ExecOutput:
    """Everything a finished command printed, and how it ended."""

    stdout: bytes
    stderr: bytes
    result: ExecResult


@dataclass(frozen=True)
class FileStat:
    """``stat`` of a path in the guest."""

    type: str  # one of protocol.FILE_TYPES
    size: int
    mode: int  # permission bits (0o7777)
    uid: int
    gid: int
    mtime_ns: int
    nlink: int
    target: str | None = None  # symlink target


@dataclass(frozen=True)
class DirEntry:
    """One entry of ``list_dir`` (symlinks are not followed)."""

    name: str
    type: str
    size: int
    mode: int


@dataclass(frozen=True)
class ResyncResult:
    """What ``resync`` changed."""

    clock_set: bool
    entropy_bytes: int
    entropy_credited: bool
    hostname: str | None


ExecEvent: TypeAlias = (
    tuple[Literal["stdout"], bytes]
    | tuple[Literal["stderr"], bytes]
    | tuple[Literal["exit"], ExecResult]
)


# ---------------------------------------------------------------------------
# Per-request plumbing
# ---------------------------------------------------------------------------


class _Pending:
    """The frames received for one open request."""

    def __init__(self, op: str, request_id: int) -> None:
        self.op = op
        self.request_id = request_id
        self.queue: asyncio.Queue[protocol.Frame | AgentError] = asyncio.Queue()

    async def next(self) -> protocol.Frame:
        """The next frame; raises AgentDisconnected if the stream ended first."""
        item = await self.queue.get()
        if isinstance(item, AgentError):
            self.queue.put_nowait(item)  # later calls fail the same way
            raise item
        return item

    def remote_error(self, frame: protocol.Frame) -> AgentRemoteError:
        """Turn an ERROR frame into an exception."""
        body = _decode(frame)
        return AgentRemoteError(self.op, str(body.get("code", "EIO")), str(body.get("message")))

    async def reply(self) -> dict[str, Any]:
        """Wait for the terminal frame, skipping events; return the REPLY body."""
        while True:
            frame = await self.next()
            if frame.ftype == FrameType.REPLY:
                return _decode(frame)
            if frame.ftype == FrameType.ERROR:
                raise self.remote_error(frame)
            if frame.ftype != FrameType.EVENT:
                raise AgentProtocolError(
                    f"{self.op}: unexpected {FrameType.name(frame.ftype)} frame"
                )


def _decode(frame: protocol.Frame) -> dict[str, Any]:
    try:
        return frame.json()
    except protocol.ProtocolError as exc:
        raise AgentProtocolError(f"agent sent a malformed message: {exc.message}") from None


def _exec_result(body: dict[str, Any]) -> ExecResult:
    return ExecResult(
        exit_code=body.get("exit_code"),
        signal=body.get("signal"),
        timed_out=bool(body.get("timed_out")),
    )


# ---------------------------------------------------------------------------
# Exec handle
# ---------------------------------------------------------------------------


class ExecHandle:
    """A running command: stdin in, events out.

    Iterate it (``async for kind, data in handle``) for ``("stdout", bytes)``,
    ``("stderr", bytes)`` and finally ``("exit", ExecResult)``; or call
    ``wait()`` (discards output) or ``collect()`` (keeps it).
    """

    def __init__(
        self,
        client: AgentClient,
        pending: _Pending,
        *,
        exec_id: int,
        pid: int,
        stdin_open: bool,
    ) -> None:
        self._client = client
        self._pending = pending
        self.exec_id = exec_id
        self.pid = pid
        self._stdin_open = stdin_open
        self.result: ExecResult | None = None

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
        for chunk in _split(data):
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

    async def __anext__(self) -> ExecEvent:
        if self.result is not None:
            raise StopAsyncIteration
        while True:
            try:
                frame = await self._pending.next()
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
                self.result = _exec_result(_decode(frame))
                self._stdin_open = False
                return ("exit", self.result)
            if frame.ftype == FrameType.ERROR:
                raise self._pending.remote_error(frame)
            # EVENT frames carry nothing an exec consumer needs.

    async def wait(self) -> ExecResult:
        """Wait for the exit, discarding remaining output."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def collect(self) -> ExecOutput:
        """Wait for the exit, gathering the remaining output."""
        out: list[bytes] = []
        err: list[bytes] = []
        async for event in self:
            if event[0] == "stdout":
                out.append(event[1])
            elif event[0] == "stderr":
                err.append(event[1])
        assert self.result is not None
        return ExecOutput(b"".join(out), b"".join(err), self.result)


def _split(data: bytes) -> Iterable[bytes]:
    """Split data into frame-sized, non-empty chunks (empty means EOF on the wire)."""
    view = memoryview(data)
    for start in range(0, len(view), protocol.MAX_FRAME_PAYLOAD):
        yield bytes(view[start : start + protocol.MAX_FRAME_PAYLOAD])


async def _chunks(data: bytes | AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        for chunk in _split(bytes(data)):
            yield chunk
    elif isinstance(data, AsyncIterable):
        async for piece in data:
            for chunk in _split(piece):
                yield chunk
    else:
        for piece in data:
            for chunk in _split(piece):
                yield chunk


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


class AgentClient:
    """A connection to one guest agent. Create with connect_unix() or from_streams()."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._state = ClientState.CONNECTED
        self._lost: AgentDisconnected | None = None
        self.info: AgentInfo | None = None
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="kelpie-agent-reader"
        )

    # -- construction and lifecycle --------------------------------------------------

    @classmethod
    async def connect_unix(
        cls,
        path: str,
        *,
        timeout: float = 10.0,
        retry_interval: float = 0.05,
    ) -> AgentClient:
        """Connect to a unix socket, retrying until ``timeout`` seconds passed.

        The socket may not exist yet (the VM or agent is starting). With
        virtio-serial it is QEMU's chardev socket: bytes sent before the
        guest opens its port wait there, so call ``hello()`` with a timeout
        that covers the guest's boot.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(path, limit=_READ_SIZE), max(remaining, 0.001)
                )
            except OSError as exc:
                retryable = isinstance(
                    exc, (FileNotFoundError, ConnectionRefusedError, TimeoutError)
                )
                if not retryable or time.monotonic() + retry_interval >= deadline:
                    raise AgentConnectError(
                        f"could not connect to the agent socket {path} within {timeout:g}s: "
                        f"{exc!r}; is the VM running?"
                    ) from exc
                await asyncio.sleep(retry_interval)
            else:
                return cls(reader, writer)

    @classmethod
    def from_streams(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> AgentClient:
        """Wrap an already connected stream (e.g. vsock after Firecracker's CONNECT)."""
        return cls(reader, writer)

    @property
    def state(self) -> ClientState:
        """Lifecycle state."""
        return self._state

    async def close(self) -> None:
        """Close the stream; pending requests fail with AgentDisconnected."""
        self._state = ClientState.CLOSED
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        await self._reader_task

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- session ---------------------------------------------------------------------

    async def hello(self, *, timeout: float | None = None) -> AgentInfo:
        """Handshake: check the protocol version and learn about the agent."""
        if self._state is not ClientState.CONNECTED:
            raise AgentProtocolError(
                f"hello() is only allowed once, right after connecting "
                f"(state is {self._state.value})"
            )
        try:
            async with asyncio.timeout(timeout):
                body = await self._call("hello", _state_ok=True, version=protocol.PROTOCOL_VERSION)
        except TimeoutError:
            raise AgentConnectError(f"the agent did not answer hello within {timeout:g}s") from None
        except AgentRemoteError as exc:
            if exc.code == "EPROTONOSUPPORT":
                raise AgentVersionError(exc.message) from exc
            raise
        if body.get("version") != protocol.PROTOCOL_VERSION:
            raise AgentVersionError(
                f"agent speaks protocol version {body.get('version')}, this host speaks "
                f"{protocol.PROTOCOL_VERSION}: install the matching agent into the guest"
            )
        self.info = AgentInfo(
            version=body["version"],
            agent_pid=body["agent_pid"],
            boot_id=body["boot_id"],
            hostname=body["hostname"],
            root=body["root"],
            time_ns=body["time_ns"],
            execs=tuple(
                ExecInfo(e["exec_id"], e["pid"], tuple(e["argv"]), e["pty"], e["running"])
                for e in body["execs"]
            ),
        )
        self._state = ClientState.READY
        return self.info

    async def ping(self) -> float:
        """Round trip to the agent; returns the elapsed seconds."""
        start = time.perf_counter()
        await self._call("ping")
        return time.perf_counter() - start

    async def shutdown(self, *, poweroff: bool = True) -> None:
        """Ask the agent to exit (and power the VM off, when it serves a device)."""
        await self._call("shutdown", poweroff=poweroff)

    async def resync(
        self,
        *,
        epoch_ns: int | None = None,
        entropy: bytes | None = None,
        hostname: str | None = None,
    ) -> ResyncResult:
        """After a restore: set the guest clock, reseed its RNG, rename it."""
        body = await self._call(
            "resync",
            epoch_ns=epoch_ns,
            entropy=entropy.hex() if entropy else None,
            hostname=hostname,
        )
        return ResyncResult(
            clock_set=body["clock_set"],
            entropy_bytes=body["entropy_bytes"],
            entropy_credited=body["entropy_credited"],
            hostname=body["hostname"],
        )

    # -- exec ------------------------------------------------------------------------

    async def exec(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: bytes | None = None,
        stdin_open: bool = False,
        timeout: float | None = None,
        pty: bool = False,
        term_size: tuple[int, int] | None = None,
    ) -> ExecHandle:
        """Start a command in the guest; returns once it is running.

        ``stdin`` bytes are sent, then EOF unless ``stdin_open``; with neither,
        stdin is /dev/null. ``timeout`` seconds after the start the agent
        SIGKILLs the command's whole process group. ``pty`` runs it on a
        terminal of ``term_size`` (rows, cols). Raises AgentRemoteError when
        the command cannot start (e.g. code ENOENT for a missing program).
        """
        fields: dict[str, Any] = {"argv": list(argv), "pty": pty}
        if env is not None:
            fields["env"] = dict(env)
        if cwd is not None:
            fields["cwd"] = cwd
        if user is not None:
            fields["user"] = user
        if timeout is not None:
            fields["timeout"] = timeout
        if term_size is not None:
            fields["rows"], fields["cols"] = term_size
        fields["stdin"] = stdin is not None or stdin_open
        pending = await self._open("exec", fields)
        try:
            if stdin:
                for chunk in _split(stdin):
                    await self._send(
                        protocol.encode_frame(FrameType.STDIN, pending.request_id, chunk)
                    )
            if stdin is not None and not stdin_open:
                await self._send(protocol.encode_frame(FrameType.STDIN, pending.request_id))
            return await self._started(pending, stdin_open=stdin_open)
        except BaseException:
            self._abandon(pending, cancel=True)
            raise

    async def attach(self, exec_id: int, *, stdin_open: bool = False) -> ExecHandle:
        """Take over an exec started on an earlier connection (see AgentInfo.execs)."""
        pending = await self._open("attach", {"exec_id": exec_id})
        try:
            return await self._started(pending, stdin_open=stdin_open)
        except BaseException:
            self._abandon(pending, cancel=False)
            raise

    async def _started(self, pending: _Pending, *, stdin_open: bool) -> ExecHandle:
        frame = await pending.next()
        if frame.ftype == FrameType.ERROR:
            self._pending.pop(pending.request_id, None)
            raise pending.remote_error(frame)
        body = _decode(frame)
        if frame.ftype != FrameType.EVENT or body.get("event") != "started":
            raise AgentProtocolError(f"{pending.op}: expected a 'started' event, got {body!r}")
        return ExecHandle(
            self, pending, exec_id=body["exec_id"], pid=body["pid"], stdin_open=stdin_open
        )

    # -- files -------------------------------------------------------------------------

    async def read_file(self, path: str) -> AsyncIterator[bytes]:
        """Stream a guest file's contents in chunks."""
        pending = await self._open("read_file", {"path": path})
        try:
            while True:
                frame = await pending.next()
                if frame.ftype == FrameType.FILE_DATA:
                    yield frame.payload
                elif frame.ftype == FrameType.REPLY:
                    return
                elif frame.ftype == FrameType.ERROR:
                    raise pending.remote_error(frame)
                else:
                    raise AgentProtocolError(
                        f"read_file: unexpected {FrameType.name(frame.ftype)} frame"
                    )
        finally:
            self._abandon(pending, cancel=True)  # no-op once the transfer ended

    async def read_bytes(self, path: str) -> bytes:
        """A whole guest file."""
        return b"".join([chunk async for chunk in self.read_file(path)])

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes] | Iterable[bytes],
        *,
        mode: int = 0o644,
    ) -> int:
        """Write a guest file atomically (temp file + rename); returns its size."""
        pending = await self._open("write_file", {"path": path, "mode": mode})
        try:
            async for chunk in _chunks(data):
                if not pending.queue.empty():
                    break  # the agent already refused: its ERROR is waiting
                await self._send(
                    protocol.encode_frame(FrameType.FILE_DATA, pending.request_id, chunk)
                )
            if pending.queue.empty():
                await self._send(protocol.encode_frame(FrameType.FILE_DATA, pending.request_id))
            body = await pending.reply()
            return int(body["size"])
        finally:
            self._abandon(pending, cancel=True)  # no-op once the transfer ended

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        """Describe a guest path."""
        body = await self._call("stat", path=path, follow_symlinks=follow_symlinks)
        return FileStat(
            type=body["type"],
            size=body["size"],
            mode=body["mode"],
            uid=body["uid"],
            gid=body["gid"],
            mtime_ns=body["mtime_ns"],
            nlink=body["nlink"],
            target=body.get("target"),
        )

    async def list_dir(self, path: str) -> list[DirEntry]:
        """Entries of a guest directory, sorted by name."""
        pending = await self._open("list", {"path": path})
        entries: list[dict[str, Any]] = []
        try:
            while True:
                frame = await pending.next()
                if frame.ftype == FrameType.ERROR:
                    raise pending.remote_error(frame)
                entries.extend(_decode(frame).get("entries", []))
                if frame.ftype == FrameType.REPLY:
                    break
        finally:
            self._abandon(pending, cancel=False)
        return [DirEntry(e["name"], e["type"], e["size"], e["mode"]) for e in entries]

    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> None:
        """Create a guest directory (``parents=True``: like ``mkdir -p``)."""
        await self._call("mkdir", path=path, parents=parents, mode=mode)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a guest file, symlink or directory."""
        await self._call("remove", path=path, recursive=recursive)

    # -- plumbing ----------------------------------------------------------------------

    def _allocate_id(self) -> int:
        while True:
            rid = self._next_id
            self._next_id = rid % protocol.MAX_REQUEST_ID + 1
            if rid not in self._pending:
                return rid

    async def _open(self, op: str, fields: dict[str, Any], *, state_ok: bool = False) -> _Pending:
        """Send a request; return the queue its frames will arrive on."""
        if self._lost is not None:
            raise AgentDisconnected(f"{op}: {self._lost}")
        if self._state is not ClientState.READY and not state_ok:
            if self._state is ClientState.CLOSED:
                raise AgentDisconnected(f"{op}: the agent client is closed")
            raise AgentProtocolError(f"{op}: call hello() before any other request")
        pending = _Pending(op, self._allocate_id())
        frame = protocol.encode_json(FrameType.REQUEST, pending.request_id, {"op": op, **fields})
        self._pending[pending.request_id] = pending
        try:
            await self._send(frame)
        except BaseException:
            self._pending.pop(pending.request_id, None)
            raise
        return pending

    async def _call(self, op: str, *, _state_ok: bool = False, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its REPLY body."""
        pending = await self._open(op, fields, state_ok=_state_ok)
        try:
            return await pending.reply()
        finally:
            self._pending.pop(pending.request_id, None)

    def _abandon(self, pending: _Pending, *, cancel: bool) -> None:
        """Stop listening for a request; ``cancel`` tells the agent to drop it too.

        A request whose terminal frame arrived is already gone: then no-op.
        """
        if self._pending.pop(pending.request_id, None) is None or not cancel:
            return
        if self._lost is None and self._state is not ClientState.CLOSED:
            # Fire and forget (no drain): this runs during cancellation too.
            cancel_id = self._allocate_id()
            self._writer.write(
                protocol.encode_json(
                    FrameType.REQUEST, cancel_id, {"op": "cancel", "target": pending.request_id}
                )
            )

    async def _send(self, frame: bytes) -> None:
        if self._lost is not None:
            raise AgentDisconnected(str(self._lost))
        if self._state is ClientState.CLOSED:
            raise AgentDisconnected("the agent client is closed")
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except ConnectionError as exc:
            raise AgentDisconnected(f"writing to the agent failed: {exc!r}") from exc

    async def _read_loop(self) -> None:
        """Demultiplex frames to their requests until the stream ends."""
        decoder = protocol.FrameDecoder()
        reason = "the agent closed the connection"
        try:
            while data := await self._reader.read(_READ_SIZE):
                decoder.feed(data)
                for item in decoder.frames():
                    self._route(item)
        except (ConnectionError, OSError) as exc:
            reason = f"reading from the agent failed: {exc!r}"
        except asyncio.CancelledError:
            reason = "the agent client was cancelled"
            raise
        finally:
            if self._state is ClientState.CLOSED:
                reason = "the agent client was closed"
            self._fail_all(AgentDisconnected(reason))
            self._writer.close()  # release the socket even if close() is never called

    def _route(self, item: protocol.Frame | protocol.Garbage) -> None:
        if isinstance(item, protocol.Garbage):
            logger.warning("agent stream: skipped %d bytes (%s)", item.skipped, item.reason)
            return
        if item.request_id == 0:
            logger.warning("agent reported a connection-level problem: %r", item.payload[:500])
            return
        pending = self._pending.get(item.request_id)
        if pending is None:
            logger.debug("dropping %r: no open request", item)
            return
        if item.ftype in (FrameType.REPLY, FrameType.ERROR):
            del self._pending[item.request_id]
        pending.queue.put_nowait(item)

    def _fail_all(self, error: AgentDisconnected) -> None:
        self._lost = error
        self._state = ClientState.CLOSED
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.queue.put_nowait(error)
