"""Network benchmark: a sandbox's egress through its own namespace vs QEMU's user network.

Both VMs run the same guest kit with network ``nat`` in the same process and run; the
baseline's QEMU runs in the host's namespace (QEMU's user network as it is, what Kelpie did
before sandboxes got their own), the other in its namespace behind its nftables rules (the
path every ``nat`` and ``policy`` sandbox takes now). The peer is a server in a network
namespace this script makes (198.18.9.1, joined by veth: no other host is involved). From
inside each guest, with Python's own sockets:

- connect latency: a TCP connect + the server's one-line greeting, median of 50;
- throughput: 32 MiB read from the server to end of file;
- DNS: one A query answered (the namespace: the sandbox's forwarder, which asks the peer's
  DNS server; the baseline: QEMU's DNS proxy, which asks the same server).

Medians of ``--runs`` repetitions, ratios against the baseline.

    python benchmarks/network.py [--runs 5] [--json benchmarks/results/network.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from kelpie import VmConfig
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import build_guestkit
from kelpie.hostnet import SandboxNetwork

PEER_NS = "kb-net-peer"
PEER, GATEWAY = "198.18.9.1", "198.18.9.254"
BULK_MIB = 32
PEER_SCRIPT = f"""
import socket, threading
import dns.message, dns.rrset
def greet():
    s = socket.create_server(("{PEER}", 8080), backlog=128)
    while True:
        c, _ = s.accept(); c.sendall(b"hello\\n"); c.close()
def bulk():
    s = socket.create_server(("{PEER}", 8081)); block = b"x" * (1 << 20)
    while True:
        c, _ = s.accept()
        for _ in range({BULK_MIB}): c.sendall(block)
        c.close()
def dns_server():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("{PEER}", 53))
    while True:
        data, addr = s.recvfrom(4096); q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 5, "IN", "A", "{PEER}"))
        s.sendto(r.to_wire(), addr)
for f in (greet, bulk): threading.Thread(target=f, daemon=True).start()
print("ready", flush=True)
dns_server()
"""
GUEST_PROBE = f"""
import socket, struct, sys, time
def connect_ms():
    times = []
    for _ in range(50):
        t = time.perf_counter(); s = socket.socket(); s.connect(("{PEER}", 8080)); s.recv(16)
        times.append((time.perf_counter() - t) * 1000); s.close()
    return sorted(times)[len(times) // 2]
def throughput():
    s = socket.socket(); s.connect(("{PEER}", 8081)); t = time.perf_counter(); n = 0
    while chunk := s.recv(1 << 16): n += len(chunk)
    return n / (1 << 20) / (time.perf_counter() - t)
def dns_ms(server):
    q = struct.pack("!HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"\\x04peer\\x04test\\x00" + \\
        struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    t = time.perf_counter(); s.sendto(q, (server, 53)); s.recv(512)
    return (time.perf_counter() - t) * 1000
print(connect_ms(), throughput(), dns_ms(sys.argv[1]))
"""


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def make_peer() -> subprocess.Popen[str]:
    run("ip", "netns", "add", PEER_NS)
    run("ip", "link", "add", "kbnet0", "type", "veth", "peer", "name", "eth0", "netns", PEER_NS)
    run("ip", "addr", "add", f"{GATEWAY}/24", "dev", "kbnet0")
    run("ip", "link", "set", "kbnet0", "up")
    for command in (["addr", "add", f"{PEER}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", GATEWAY]):
        run("ip", "-n", PEER_NS, *command)
    peer = subprocess.Popen(["ip", "netns", "exec", PEER_NS, sys.executable, "-c", PEER_SCRIPT],
                            stdout=subprocess.PIPE, text=True)
    assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
    return peer


def remove_peer(peer: subprocess.Popen[str]) -> None:
    peer.kill()
    peer.wait()
    subprocess.run(["ip", "link", "del", "kbnet0"], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True, check=False)


async def measure(vm: QemuVm, dns_server: str) -> tuple[float, float, float]:
    result = await vm.exec(["python3", "-c", GUEST_PROBE, dns_server], timeout=300)
    if result.exit_code != 0:
        raise RuntimeError(f"the probe failed in the guest: {result.stderr.decode()}")
    connect, mib_s, dns = (float(v) for v in result.stdout.split())
    return connect, mib_s, dns


async def main(runs: int) -> dict[str, Any]:
    kit = build_guestkit()
    work = Path(tempfile.mkdtemp(prefix="kbn", dir="/tmp"))
    os.environ["KELPIE_DNS_UPSTREAM"] = PEER
    peer = make_peer()
    samples: dict[str, list[tuple[float, float, float]]] = {"baseline": [], "namespace": []}
    try:
        # the baseline's QEMU resolves through the host's resolv.conf: point it at the peer
        baseline = QemuVm(VmConfig(network="nat"), kit=kit)
        baseline.workdir = work / baseline.id
        with mock.patch.object(SandboxNetwork, "needed", staticmethod(lambda config: False)):
            await baseline.start()
        sandboxed = QemuVm(VmConfig(network="nat"), kit=kit)
        sandboxed.workdir = work / sandboxed.id
        await sandboxed.start()
        try:
            for _ in range(runs):
                samples["namespace"].append(await measure(sandboxed, "10.0.2.3"))
                samples["baseline"].append(await measure(baseline, PEER))
        finally:
            await baseline.stop(force=True)
            await sandboxed.stop(force=True)
    finally:
        remove_peer(peer)
    figures = {name: {"connect_ms": median([s[0] for s in values]),
                      "throughput_mib_s": median([s[1] for s in values]),
                      "dns_ms": median([s[2] for s in values])}
               for name, values in samples.items()}
    return {"runs": runs, "bulk_mib": BULK_MIB, "host": platform.node(),
            "machine": platform.machine(), "figures": figures, "samples": samples}


def table(result: dict[str, Any]) -> str:
    base, new = result["figures"]["baseline"], result["figures"]["namespace"]
    lines = ["| figure | own namespace + rules | QEMU user network (same run) | ratio |",
             "|---|---|---|---|"]
    for key, label, unit in (("connect_ms", "TCP connect + first line", "ms"),
                             ("throughput_mib_s", f"throughput ({BULK_MIB} MiB)", "MiB/s"),
                             ("dns_ms", "DNS query", "ms")):
        lines.append(f"| {label} | {new[key]:.2f} {unit} | {base[key]:.2f} {unit} | "
                     f"{new[key] / base[key]:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    outcome = asyncio.run(main(args.runs))
    print(table(outcome))
    if args.json is not None:
        args.json.write_text(json.dumps(outcome, indent=2) + "\n")
