"""Asyncio client for the Kelpie guest agent (host side of ``kelpie.protocol``).

One ``AgentClient`` owns one byte stream to one agent (a QEMU virtio-serial
chardev socket, a vsock connection, or the agent's own unix socket in test
mode). A single reader task decodes frames and hands each to the queue of
the request it belongs to, so any number of requests (execs, transfers,
file ops) run concurrently over the one stream.

Lifecycle (``ClientState``)::

    connect_unix()/from_streams() --> CONNECTED --hello()--> READY
                                          ^                    |
                                          +-- agent restarted -+
             every state --close() or the stream ends--> CLOSED

Requests and how the stream ends: :mod:`kelpie.agent._connection` (a restarted agent
answers 'send hello first'; the client is then CONNECTED again, for a new ``hello()``).

Errors: see :mod:`kelpie.agent._errors`. ``asyncio.CancelledError`` is never wrapped or
swallowed. Output and file chunks are queued without bound until consumed: read your
exec streams and downloads (the agent in turn pauses a command whose output the host
does not drain from the socket).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Collection, Iterable, Mapping
from typing import Any, BinaryIO, TypeVar

from kelpie import protocol
from kelpie.agent._connection import READ_SIZE, AgentConnection
from kelpie.agent._errors import (
    AgentConnectError,
    AgentProtocolError,
    AgentRemoteError,
    AgentVersionError,
)
from kelpie.agent._handle import ExecHandle, Pending, chunks, decode, split
from kelpie.agent._types import (
    AgentInfo,
    ClientState,
    DirEntry,
    ExecInfo,
    FileStat,
    ResyncResult,
)
from kelpie.protocol import FrameType
from kelpie.vm import GuestProcesses, GuestUsage, TreeEntry

R = TypeVar("R")

MAX_WALK_ENTRIES = 2_000_000
"""The most entries a ``walk`` may report (a guest could make an endless listing)."""


class AgentClient(AgentConnection):
    """The agent's operations (hello, exec, files...) on a connection. Create with
    connect_unix() or from_streams()."""

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
                    asyncio.open_unix_connection(path, limit=READ_SIZE), max(remaining, 0.001)
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
    async def connect_hybrid_vsock(
        cls,
        path: str,
        port: int,
        *,
        timeout: float = 10.0,
        retry_interval: float = 0.05,
    ) -> AgentClient:
        """Connect to the guest's vsock ``port`` through a VMM's hybrid-vsock unix socket
        (Firecracker, Cloud Hypervisor): send ``CONNECT <port>``, expect ``OK <n>``.

        Retried until ``timeout`` seconds passed: the socket may not exist yet, and the VMM
        closes the connection while nothing listens on the port in the guest (it boots).
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                async with asyncio.timeout(remaining):
                    reader, writer = await asyncio.open_unix_connection(path, limit=READ_SIZE)
                    writer.write(f"CONNECT {port}\n".encode())
                    await writer.drain()
                    reply = await reader.readline()
            except (OSError, TimeoutError) as exc:
                last = exc
            else:
                if reply.startswith(b"OK ") and reply.endswith(b"\n"):
                    return cls(reader, writer)
                writer.close()
                if reply:  # an answer that is not OK: the VMM refused, not a boot race
                    raise AgentConnectError(
                        f"the hybrid vsock {path} answered CONNECT {port} with {reply[:80]!r},"
                        " not OK")
                last = "closed before OK (nothing listens on the port yet)"
            await asyncio.sleep(retry_interval)
        raise AgentConnectError(f"could not reach vsock port {port} through {path} within "
                                f"{timeout:g}s: {last!r}; is the VM running?")

    @classmethod
    def from_streams(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> AgentClient:
        """Wrap an already connected stream (e.g. vsock after Firecracker's CONNECT)."""
        return cls(reader, writer)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- session ---------------------------------------------------------------------

    async def hello(self, *, timeout: float | None = None) -> AgentInfo:
        """Handshake: check the protocol version and learn about the agent."""
        if self._state is not ClientState.CONNECTED:
            raise AgentProtocolError(
                f"hello() is only allowed right after connecting, or after the agent "
                f"restarted (state is {self._state.value})"
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

    async def usage(self) -> GuestUsage:
        """The guest kernel's counters (CPU, memory, root disk, network, processes)."""
        return _checked("usage", GuestUsage.from_reply, await self._call("usage"))

    async def processes(self) -> GuestProcesses:
        """The guest's processes."""
        return _checked("processes", GuestProcesses.from_reply, await self._call("processes"))

    async def sweep(self, keep: Collection[int] = ()) -> int:
        """Kill every guest process but init, the agent, kernel threads and ``keep``; how
        many are left (none unless they outran every round)."""
        return _count_field("sweep", await self._call("sweep", keep=sorted(keep)), "left")

    async def grow_fs(self, size: int) -> int:
        """Grow the file system of the agent's root to ``size`` bytes (its disk must be
        that big already); the file system's new size, as the guest reports it."""
        body = await self._call("grow_fs", size=size)
        return _checked("grow_fs", _fs_size, body)

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
        replay: int = 0,
    ) -> ExecHandle:
        """Start a command in the guest; returns once it is running (the agent holds that
        news up to 10 ms to send it with the command's first output or its exit).

        ``stdin`` bytes are sent, then EOF unless ``stdin_open``; with neither,
        stdin is /dev/null. ``timeout`` seconds after the start the agent
        SIGKILLs the command's whole process group. ``pty`` runs it on a
        terminal of ``term_size`` (rows, cols). ``replay``: bytes of its latest
        output the agent keeps for :meth:`attach` to replay. Raises
        AgentRemoteError when the command cannot start (e.g. code ENOENT for a
        missing program).
        """
        fields: dict[str, Any] = {"argv": list(argv), "pty": pty}
        if replay:
            fields["replay"] = replay
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
                for chunk in split(stdin):
                    await self._send(
                        protocol.encode_frame(FrameType.STDIN, pending.request_id, chunk)
                    )
            if stdin is not None and not stdin_open:
                await self._send(protocol.encode_frame(FrameType.STDIN, pending.request_id))
            return await self._started(pending, stdin_open=stdin_open)
        except BaseException:
            self._abandon(pending, cancel=True)
            raise

    async def attach(self, exec_id: int, *, stdin_open: bool = False,
                     offset: int | None = None) -> ExecHandle:
        """Take over an exec started on an earlier connection (see AgentInfo.execs);
        ``offset``: the bytes of its output the caller has already, to replay what the
        exec kept after them (see :attr:`ExecHandle.offset`)."""
        fields: dict[str, Any] = {"exec_id": exec_id}
        if offset is not None:
            fields["offset"] = offset
        pending = await self._open("attach", fields)
        try:
            return await self._started(pending, stdin_open=stdin_open)
        except BaseException:
            self._abandon(pending, cancel=False)
            raise

    async def _started(self, pending: Pending, *, stdin_open: bool) -> ExecHandle:
        frame = await pending.next()
        if frame.ftype == FrameType.ERROR:
            self._pending.pop(pending.request_id, None)
            raise pending.remote_error(frame)
        body = decode(frame)
        if frame.ftype != FrameType.EVENT or body.get("event") != "started":
            raise AgentProtocolError(f"{pending.op}: expected a 'started' event, got {body!r}")
        offset = body.get("offset")  # (agents before replay do not say)
        return ExecHandle(
            self, pending, exec_id=body["exec_id"], pid=body["pid"], stdin_open=stdin_open,
            offset=offset if isinstance(offset, int) and offset >= 0 else None,
        )

    # -- files -------------------------------------------------------------------------

    async def read_file(self, path: str) -> AsyncGenerator[bytes, None]:
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

    async def mark(self) -> int:
        """Have the guest remember its file system now, for :meth:`layer`; the mark."""
        body = await self._call("mark")
        return _count_field("mark", body, "mark")

    async def layer(self, mark: int, out: BinaryIO) -> tuple[int, int]:
        """Write into ``out`` the guest's changes since ``mark`` as a layer tar (made in the
        guest; untrusted); the new mark and the number of entries."""
        pending = await self._open("layer", {"mark": mark})
        try:
            while True:
                frame = await pending.next()
                if frame.ftype == FrameType.FILE_DATA:
                    out.write(frame.payload)
                elif frame.ftype == FrameType.REPLY:
                    body = decode(frame)
                    return (_count_field("layer", body, "mark"),
                            _count_field("layer", body, "entries"))
                elif frame.ftype == FrameType.ERROR:
                    raise pending.remote_error(frame)
                else:
                    raise AgentProtocolError(
                        f"layer: unexpected {FrameType.name(frame.ftype)} frame")
        finally:
            self._abandon(pending, cancel=True)

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
            async for chunk in chunks(data):
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
                entries.extend(decode(frame).get("entries", []))
                if frame.ftype == FrameType.REPLY:
                    break
        finally:
            self._abandon(pending, cancel=False)
        return [DirEntry(e["name"], e["type"], e["size"], e["mode"]) for e in entries]

    async def walk(self, path: str = "/", *, limit: int = MAX_WALK_ENTRIES) -> list[TreeEntry]:
        """Every entry of the guest file system below ``path`` (not into other mounts);
        AgentProtocolError for a malformed entry or more than ``limit`` of them."""
        pending = await self._open("walk", {"path": path})
        entries: list[TreeEntry] = []
        try:
            while True:
                frame = await pending.next()
                if frame.ftype == FrameType.ERROR:
                    raise pending.remote_error(frame)
                batch = decode(frame).get("entries", [])
                if not isinstance(batch, list) or len(entries) + len(batch) > limit:
                    raise AgentProtocolError(f"walk: more than {limit} entries, or a batch "
                                             "that is not a list")
                entries.extend(_checked("walk", TreeEntry.from_reply, item) for item in batch)
                if frame.ftype == FrameType.REPLY:
                    break
        finally:
            self._abandon(pending, cancel=False)  # the agent walks in one go: nothing to stop
        return entries

    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> None:
        """Create a guest directory (``parents=True``: like ``mkdir -p``)."""
        await self._call("mkdir", path=path, parents=parents, mode=mode)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a guest file, symlink or directory."""
        await self._call("remove", path=path, recursive=recursive)


def _fs_size(body: dict[str, Any]) -> int:
    size = body.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size is {size!r}, expected a number of bytes")
    return size


def _count_field(op: str, body: dict[str, Any], name: str) -> int:
    """A whole number >= 0 the agent's reply must carry."""
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AgentProtocolError(f"{op}: '{name}' must be a whole number >= 0, got "
                                 f"{value!r:.40}")
    return value


def _checked(op: str, parse: Callable[[dict[str, Any]], R], body: dict[str, Any]) -> R:
    """A reply the guest sent, parsed; a malformed one is the agent's protocol error."""
    try:
        return parse(body)
    except ValueError as exc:
        raise AgentProtocolError(f"{op}: the agent's reply is malformed: {exc}") from None
