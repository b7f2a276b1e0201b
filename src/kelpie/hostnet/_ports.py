"""Published ports of a sandbox whose VMM runs in its own network namespace.

The VMM forwards each port from the namespace's own address; these relays listen where
the user asked (``-p 127.0.0.1:8080:80``) on the host and carry every TCP connection and
UDP datagram to it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import cast

from kelpie.vm import PortMapping

BUFFER = 1 << 16
MAX_UDP_PEERS = 256


async def relay_port(mapping: PortMapping, inner: str) -> asyncio.AbstractServer | \
        asyncio.BaseTransport:
    """Listen on the mapping's host address and carry traffic to ``inner``:host_port."""
    if mapping.protocol == "udp":
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpRelay((inner, mapping.host_port)),
            local_addr=(mapping.host_ip, mapping.host_port))
        return transport

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            inner_reader, inner_writer = await asyncio.open_connection(inner, mapping.host_port)
        except OSError:
            writer.close()
            return
        # each direction ends with a half-close and the sockets close when both have; a
        # reset in one direction ends the other at once
        ways = {asyncio.ensure_future(_pipe(reader, inner_writer)),
                asyncio.ensure_future(_pipe(inner_reader, writer))}
        done, pending = await asyncio.wait(ways, return_when=asyncio.FIRST_COMPLETED)
        if not all(way.result() for way in done):
            for end in (writer, inner_writer):
                end.close()
        if pending:
            await asyncio.wait(pending)
        for end in (writer, inner_writer):
            end.close()

    return await asyncio.start_server(carry, mapping.host_ip, mapping.host_port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Copy until end of file and pass the half-close on; False if the connection broke."""
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ConnectionError):
        return False
    return True


class _UdpRelay(asyncio.DatagramProtocol):
    """One host UDP socket; each peer gets its own socket toward the sandbox, so replies
    find their way back."""

    def __init__(self, inner: tuple[str, int]) -> None:
        self._inner = inner
        self._outer: asyncio.DatagramTransport | None = None
        self._peers: OrderedDict[tuple[str, int], asyncio.DatagramTransport] = OrderedDict()
        self._opening: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (in Python 3.11 the selector loop's UDP transport is not a DatagramTransport)
        self._outer = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        peer = self._peers.get(addr)
        if peer is not None:
            self._peers.move_to_end(addr)
            peer.sendto(data)
        elif addr in self._opening:
            self._opening[addr].append(data)
        else:
            self._opening[addr] = [data]
            task = asyncio.ensure_future(self._open(addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        outer = self._outer
        assert outer is not None

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _: tuple[str, int]) -> None:
                assert outer is not None
                outer.sendto(data, addr)

        try:
            transport, _ = await loop.create_datagram_endpoint(Back, remote_addr=self._inner)
        except OSError:
            self._opening.pop(addr, None)
            return
        self._peers[addr] = transport
        for data in self._opening.pop(addr, []):
            transport.sendto(data)
        while len(self._peers) > MAX_UDP_PEERS:
            _, oldest = self._peers.popitem(last=False)
            oldest.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for transport in self._peers.values():
            transport.close()
        self._peers.clear()
