"""Servers for the egress tests: TCP servers that greet with their own address, and a DNS
server with a small zone. Run it in a test's network namespace (or on the host); it prints
``ready`` once everything listens.

    python3 egress_peer.py --tcp 198.18.7.1:8080 --dns 198.18.7.1 --zone allowed.test=198.18.7.1
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host = writer.get_extra_info("sockname")[0]
    writer.write(f"hello from {host}\n".encode())
    await writer.drain()
    writer.close()


class Zone(asyncio.DatagramProtocol):
    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text()
        if name not in self.records:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(name, 5, "IN", "A", self.records[name]))
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", action="append", default=[], help="ADDR:PORT ([v6]:PORT)")
    parser.add_argument("--dns", default=None, help="address of the DNS server (port 53)")
    parser.add_argument("--zone", action="append", default=[], help="NAME=ADDRESS")
    args = parser.parse_args()
    for item in args.tcp:
        host, _, port = item.rpartition(":")
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        await asyncio.start_server(greet, host.strip("[]"), int(port), family=family)
    if args.dns:
        records = {f"{k.rstrip('.')}.": v for k, v in (z.split("=") for z in args.zone)}
        await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: Zone(records), local_addr=(args.dns, 53))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
