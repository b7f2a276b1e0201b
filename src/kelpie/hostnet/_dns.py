"""A sandbox's DNS forwarder: it answers only for the names the sandbox's rules allow.

It listens on the sandbox namespace's gateway (the only DNS server the namespace may
reach), asks the host's resolvers, and before it answers pins the addresses of every name
rule the name matches into that rule's nftables sets (:func:`kelpie.hostnet.name_sets`), so
``*.pythonhosted.org:443`` lets the guest reach exactly what the forwarder told it. A name
the rules do not allow is answered REFUSED; a query that is not DNS is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from kelpie.vm import EgressPolicy, NetworkMode
from kelpie.vm._egress import Address

UPSTREAM_TIMEOUT = 3.0
MAX_TCP_MESSAGE = 65535

log = logging.getLogger("kelpie.hostnet.dns")

Pin = Callable[[str, list[Address]], Awaitable[None]]
"""``pin(name, addresses)``: add what ``name`` resolved to, to the sets of its rules."""


class DnsForwarder:
    """Answers queries for one sandbox: ``rules()`` gives its mode and policy now."""

    def __init__(self, rules: Callable[[], tuple[NetworkMode, EgressPolicy]],
                 upstream: list[tuple[str, int]], pin: Pin) -> None:
        if not upstream:
            raise ValueError("no upstream DNS server")
        self._rules = rules
        self._upstream = upstream
        self._pin = pin

    async def answer(self, wire: bytes) -> bytes | None:
        """The answer to one query in wire format (None: not a query; drop it)."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None
        if query.flags & dns.flags.QR:
            return None  # a response, not a query
        if len(query.question) != 1:
            return _refuse(query, dns.rcode.FORMERR)
        name = query.question[0].name.to_text(omit_final_dot=True)
        mode, policy = self._rules()
        if not policy.allows_name(name, narrowed=mode is NetworkMode.POLICY):
            log.info("refused %s (not allowed)", name)
            return _refuse(query, dns.rcode.REFUSED)
        answer = await self._ask(query)
        if answer is None:
            return _refuse(query, dns.rcode.SERVFAIL)
        addresses = [ipaddress.ip_address(record.address)
                     for rrset in answer.answer
                     if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
                     for record in rrset]
        if addresses:
            await self._pin(name, addresses)
        return answer.to_wire()

    async def _ask(self, query: dns.message.Message) -> dns.message.Message | None:
        for host, port in self._upstream:
            try:
                answer = await dns.asyncquery.udp(query, host, port=port,
                                                  timeout=UPSTREAM_TIMEOUT)
                if answer.flags & dns.flags.TC:
                    answer = await dns.asyncquery.tcp(query, host, port=port,
                                                      timeout=UPSTREAM_TIMEOUT)
                return answer
            except (dns.exception.DNSException, OSError) as exc:
                log.warning("upstream %s:%s did not answer: %s", host, port, exc)
        return None

    async def serve(self, address: str, port: int = 53) -> list[asyncio.AbstractServer |
                                                               asyncio.BaseTransport]:
        """Listen on ``address`` (UDP and TCP); the servers, to close."""
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(address,
                                                                                    port))
        tcp = await asyncio.start_server(self._tcp, address, port)
        return [udp, tcp]

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            async with asyncio.timeout(30):
                while True:
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = await self.answer(await reader.readexactly(size))
                    if reply is None:
                        break
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DnsForwarder) -> None:
        self._forwarder = forwarder
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (in Python 3.11 the selector loop's UDP transport is not a DatagramTransport)
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self._forwarder.answer(data)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


def _refuse(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


def upstream_servers(resolv_conf: str, override: str | None = None) -> list[tuple[str, int]]:
    """The resolvers to ask: ``override`` (``IP[:PORT],...``, e.g. from
    ``KELPIE_DNS_UPSTREAM``) or the host's ``resolv.conf`` nameservers."""
    servers: list[tuple[str, int]] = []
    if override:
        for item in override.split(","):
            host, _, port = item.strip().rpartition(":") if item.count(":") == 1 \
                else (item.strip(), "", "53")
            servers.append((host or item.strip(), int(port or 53)))
        return servers
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            servers.append((fields[1].split("%")[0], 53))
    return servers
