"""Byte channels between two daemons, and the relay that carries a live migration on them.

A live teleport must not open a hypervisor port to the network: the source's QEMU talks
to unix sockets that this module serves, and each connection is carried over the peer's
authenticated channel (a WebSocket to the target daemon) to the target's QEMU, which the
target daemon connects on its side (``/v1/teleports/{id}/live/{channel}``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from kelpie.vm import LiveEndpoints

CHANNELS = ("nbd", "migration")
"""The byte streams of a live migration: the disk mirror (NBD) and the VM state."""
READ_SIZE = 1 << 18
LINGER_SECONDS = 10.0
"""How long a relay leaving its block without an error waits for its connections to drain
(the hypervisor has written its last bytes; they may still be on their way)."""


class Channel(Protocol):
    """One end of a byte stream to another host."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes:
        """The next bytes; empty once the other end closed."""
        ...


OpenChannel = Callable[[str], AbstractAsyncContextManager[Channel]]


class StreamChannel:
    """A :class:`Channel` over an asyncio stream pair (a unix socket)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def receive(self) -> bytes:
        return await self._reader.read(READ_SIZE)

    def close(self) -> None:
        self._writer.close()


@contextlib.asynccontextmanager
async def unix_channel(path: Path) -> AsyncIterator[Channel]:
    """A channel to the unix socket at ``path``."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    channel = StreamChannel(reader, writer)
    try:
        yield channel
    finally:
        channel.close()


async def pipe(one: Channel, other: Channel) -> None:
    """Copy both ways until either end closes (then the other is given up too)."""

    async def copy(source: Channel, sink: Channel) -> None:
        while data := await source.receive():
            await sink.send(data)

    tasks = [asyncio.ensure_future(copy(one, other)), asyncio.ensure_future(copy(other, one))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def relayed(open_channel: OpenChannel, directory: Path) -> AsyncIterator[LiveEndpoints]:
    """Serve one unix socket per channel in ``directory``; every connection to one is
    carried to the target over ``open_channel(name)``. Yields the sockets to hand the
    source's hypervisor; leaving the block closes them and every relayed connection."""
    connections: set[asyncio.Task[None]] = set()

    def serve(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(carry(name, StreamChannel(reader, writer)))
            connections.add(task)
            task.add_done_callback(connections.discard)
        return accepted

    async def carry(name: str, local: StreamChannel) -> None:
        try:
            async with open_channel(name) as remote:
                await pipe(local, remote)
        except Exception:  # the hypervisor sees its connection end and reports the failure
            pass
        finally:
            local.close()

    servers = []
    failed = True
    try:
        for name in CHANNELS:
            path = directory / f"{name}.sock"
            path.unlink(missing_ok=True)
            servers.append(await asyncio.start_unix_server(serve(name), path=str(path)))
        yield LiveEndpoints(nbd_socket=directory / "nbd.sock",
                            migration_socket=directory / "migration.sock")
        failed = False
    finally:
        for server in servers:
            server.close()
        if connections and not failed:  # let the last bytes reach the target
            await asyncio.wait(list(connections), timeout=LINGER_SECONDS)
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        for name in CHANNELS:
            (directory / f"{name}.sock").unlink(missing_ok=True)
