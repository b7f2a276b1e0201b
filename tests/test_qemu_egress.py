"""Network isolation and egress rules with real VMs (QEMU, TCG).

Every destination is one this module makes: an "internet" in a network namespace joined by
veth (two servers on 198.18.7.1 and .2, and a DNS server that knows ``allowed.test``,
``api.allowed.test``, ``other.test`` and ``host.test``), and services of "the host": one
on 127.0.0.1, one on an address of a dummy interface this module adds (203.0.113.77), one
on every address. The guest tries them with busybox ``nc`` and with a raw socket from
Python, by address, by the gateway address and by name, over IPv4 and IPv6 (it configures
IPv6 itself, as a hostile root would).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from conftest import real_part_missing
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit
from kelpie.hostnet import host_addresses
from kelpie.hostnet._netns import find, key_of
from kelpie.vm import (
    EgressPolicy,
    NetworkMode,
    PortMapping,
    SnapshotKind,
    VmConfig,
    VmSnapshot,
)
from test_qemu_ports import free_port

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

PEER = Path(__file__).with_name("egress_peer.py")
TAG = os.getpid() % 10000
INTERNET = f"kt-inet-{TAG}"
NEAR, FAR = "198.18.7.1", "198.18.7.2"
DUMMY_V4, DUMMY_V6 = "203.0.113.77", "fd42::77"
WEB = 8080
LOOPBACK_PORT, DUMMY_PORT, ANY_PORT = 18081, 18082, 18083


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def _start(command: list[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # "ready" once every server listens
    if line.strip() != "ready":
        process.kill()
        raise AssertionError(f"{command} did not start: {line!r}")
    return process


@pytest.fixture(scope="module")
def world() -> Iterator[None]:
    """The internet namespace, the host's services and the DNS upstream for the helpers."""
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        real_part_missing("the egress tests need root, iproute2 and nftables")
    veth, extra = f"kti{TAG}", f"ktd{TAG}"
    peers: list[subprocess.Popen[str]] = []
    try:
        _run("ip", "netns", "add", INTERNET)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
             INTERNET)
        _run("ip", "addr", "add", "198.18.7.254/24", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        for command in (["addr", "add", f"{NEAR}/24", "dev", "eth0"],
                        ["addr", "add", f"{FAR}/24", "dev", "eth0"],
                        ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                        ["route", "add", "default", "via", "198.18.7.254"]):
            _run("ip", "-n", INTERNET, *command)
        # another address of the host: on a veth pair of its own (no dummy driver here)
        _run("ip", "link", "add", extra, "type", "veth", "peer", "name", f"{extra}p")
        _run("ip", "addr", "add", f"{DUMMY_V4}/32", "dev", extra)
        _run("ip", "addr", "add", f"{DUMMY_V6}/128", "dev", extra, "nodad")
        _run("ip", "link", "set", extra, "up")
        _run("ip", "link", "set", f"{extra}p", "up")
        zone = [f"--zone={name}={address}" for name, address in (
            ("allowed.test", NEAR), ("api.allowed.test", NEAR), ("other.test", FAR),
            ("host.test", DUMMY_V4))]
        peers.append(_start(["ip", "netns", "exec", INTERNET, sys.executable, str(PEER),
                             f"--tcp={NEAR}:{WEB}", f"--tcp={FAR}:{WEB}", f"--dns={NEAR}",
                             *zone]))
        peers.append(_start([sys.executable, str(PEER), f"--tcp=127.0.0.1:{LOOPBACK_PORT}",
                             f"--tcp=[::1]:{LOOPBACK_PORT}", f"--tcp={DUMMY_V4}:{DUMMY_PORT}",
                             f"--tcp=[{DUMMY_V6}]:{DUMMY_PORT}", f"--tcp=0.0.0.0:{ANY_PORT}"]))
        os.environ["KELPIE_DNS_UPSTREAM"] = NEAR
        yield
    finally:
        os.environ.pop("KELPIE_DNS_UPSTREAM", None)
        for peer in peers:
            peer.kill()
            peer.wait()
        for command in (["ip", "link", "del", extra], ["ip", "link", "del", veth],
                        ["ip", "netns", "del", INTERNET]):
            subprocess.run(command, capture_output=True, check=False)


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    path = Path(f"/tmp/kelpie-egress-{os.getpid()}")  # short: unix socket paths live here
    path.mkdir(exist_ok=True)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(world: None, guestkit: GuestKit, state_dir: Path) -> AsyncIterator[QemuVm]:
    """One nat sandbox (with a published port), its rules changed by the tests."""
    machine = QemuVm(VmConfig(network=NetworkMode.NAT, ports=(PortMapping(free_port(), 8000),)),
                     kit=guestkit)
    machine.workdir = state_dir / machine.id
    await machine.start()
    yield machine
    await machine.stop(force=True)
    assert machine.network.netns is None
    assert find(key_of(machine.workdir)) is None  # the namespace went with QEMU


async def connect(machine: QemuVm, host: str, port: int) -> str:
    """What the guest's ``nc`` got from host:port: the greeting, or its error."""
    result = await machine.exec(["sh", "-c", f"nc -w 3 {host} {port} </dev/null"], timeout=60)
    return (result.stdout + result.stderr).decode().strip()


async def raw_connect(machine: QemuVm, host: str, port: int) -> str:
    """The same from Python's own socket (no name lookup: an address literal)."""
    family = "AF_INET6" if ":" in host else "AF_INET"
    program = (f"import socket\ns = socket.socket(socket.{family})\ns.settimeout(3)\n"
               f"try:\n s.connect(({host!r}, {port}))\n print(s.recv(64).decode().strip())\n"
               "except OSError as e:\n print('error', e)")
    result = await machine.exec(["python3", "-c", program], timeout=60)
    return result.stdout.decode().strip()


async def test_nat_reaches_the_internet_by_address_and_name(vm: QemuVm) -> None:
    assert await connect(vm, NEAR, WEB) == f"hello from {NEAR}"
    assert await connect(vm, "other.test", WEB) == f"hello from {FAR}"
    assert await raw_connect(vm, FAR, WEB) == f"hello from {FAR}"


async def test_nat_never_reaches_the_host(vm: QemuVm) -> None:
    assert vm.network.netns is not None
    gateway = str(vm.network.netns.gateway)
    attempts = [("10.0.2.2", LOOPBACK_PORT), ("10.0.2.2", ANY_PORT), (DUMMY_V4, DUMMY_PORT),
                ("host.test", DUMMY_PORT), (gateway, ANY_PORT)]
    attempts += [(str(a), ANY_PORT) for a in host_addresses() if a.version == 4]
    for host, port in attempts:
        reply = await connect(vm, host, port)
        assert "hello" not in reply, (host, port, reply)
        if not host.endswith(".test"):
            assert "hello" not in await raw_connect(vm, host, port), (host, port)
    # the control: the same services answer on the host itself
    for host, port in (("127.0.0.1", LOOPBACK_PORT), (DUMMY_V4, DUMMY_PORT)):
        reader, writer = await asyncio.open_connection(host, port)
        assert (await reader.readline()).startswith(b"hello")
        writer.close()


async def test_nat_never_reaches_the_host_over_ipv6(vm: QemuVm) -> None:
    # root in the guest gives itself QEMU's IPv6 network; the namespace has none to go on
    # (QEMU's router advertisements may have configured some of it already)
    await vm.exec(["sh", "-c", "ip -6 addr add fec0::15/64 dev eth0; "
                               "ip -6 route add default via fec0::2"], timeout=60)
    routes = await vm.exec(["ip", "-6", "route", "show", "default"], timeout=60)
    assert b"default via" in routes.stdout, routes
    for host, port in (("fec0::2", LOOPBACK_PORT), (DUMMY_V6, DUMMY_PORT), ("::1", ANY_PORT)):
        assert "hello" not in await raw_connect(vm, host, port), host


async def test_policy_reaches_only_what_it_allows_and_changes_while_running(
    vm: QemuVm,
) -> None:
    try:
        await vm.change_network(vm.config.evolve(
            network=NetworkMode.POLICY,
            egress=EgressPolicy.parse(allow=["*.allowed.test", f"allowed.test:{WEB}"])))
        assert await connect(vm, "allowed.test", WEB) == f"hello from {NEAR}"
        assert await connect(vm, "api.allowed.test", WEB) == f"hello from {NEAR}"
        assert "hello" not in await connect(vm, FAR, WEB)  # not named
        assert "hello" not in await raw_connect(vm, FAR, WEB)
        refused = await vm.exec(["nslookup", "other.test"], timeout=60)
        assert b"REFUSED" in refused.stdout + refused.stderr
        assert "hello" not in await connect(vm, "10.0.2.2", LOOPBACK_PORT)

        await vm.change_network(vm.config.evolve(
            egress=EgressPolicy.parse(allow=[f"{FAR}:{WEB}"])))
        assert await connect(vm, FAR, WEB) == f"hello from {FAR}"
        assert "hello" not in await raw_connect(vm, NEAR, WEB)  # no longer pinned
        refused = await vm.exec(["nslookup", "allowed.test"], timeout=60)
        assert b"REFUSED" in refused.stdout + refused.stderr
    finally:
        await vm.change_network(vm.config.evolve(network=NetworkMode.NAT,
                                                 egress=EgressPolicy()))
    assert await connect(vm, NEAR, WEB) == f"hello from {NEAR}"


async def test_an_allowed_host_service_is_an_exception_in_nat(vm: QemuVm) -> None:
    try:
        await vm.change_network(vm.config.evolve(
            egress=EgressPolicy.parse(allow=[f"host:{ANY_PORT}"],
                                      deny=[f"{FAR}:{WEB}", "other.test"])))
        assert vm.network.netns is not None
        gateway = str(vm.network.netns.gateway)
        assert (await connect(vm, gateway, ANY_PORT)).startswith("hello from")
        assert "hello" not in await connect(vm, DUMMY_V4, DUMMY_PORT)  # another port
        assert "hello" not in await connect(vm, FAR, WEB)  # denied
        assert await connect(vm, NEAR, WEB) == f"hello from {NEAR}"
        # a denied name: refused by the forwarder, and no other DNS server may be asked
        for server in ("", NEAR):
            lookup = await vm.exec(["sh", "-c", f"nslookup other.test {server}"], timeout=60)
            assert FAR.encode() not in lookup.stdout, (server, lookup)
    finally:
        await vm.change_network(vm.config.evolve(egress=EgressPolicy()))


async def test_published_ports_still_come_in(vm: QemuVm) -> None:
    (port,) = vm.config.ports
    server = await vm.exec(["sh", "-c", "(echo from-the-guest | nc -l -p 8000 &) ; "
                                        "while ! netstat -ltn | grep -q ':8000 '; do "
                                        "sleep 0.05; done"], timeout=60)
    assert server.exit_code == 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port.host_port)
    assert await reader.readline() == b"from-the-guest\n"
    writer.close()


async def test_a_restored_sandbox_keeps_its_rules(vm: QemuVm, guestkit: GuestKit,
                                                  state_dir: Path) -> None:
    policy = EgressPolicy.parse(allow=[f"{NEAR}:{WEB}"])
    await vm.change_network(vm.config.evolve(network=NetworkMode.POLICY, egress=policy))
    try:
        snapshot = await vm.snapshot(state_dir / f"snap-{vm.id}", kind=SnapshotKind.FULL)
    finally:
        await vm.change_network(vm.config.evolve(network=NetworkMode.NAT,
                                                 egress=EgressPolicy()))
    # the snapshot's config (its rules with it) comes back; only the host port is new
    restored = QemuVm(VmConfig(ports=(PortMapping(free_port(), 8000),)), kit=guestkit)
    restored.workdir = state_dir / restored.id
    await restored.restore(VmSnapshot.open(snapshot.path))
    try:
        assert restored.config.egress == policy
        assert await connect(restored, NEAR, WEB) == f"hello from {NEAR}"
        assert "hello" not in await connect(restored, FAR, WEB)
    finally:
        await restored.stop(force=True)


async def test_an_attach_brings_a_dead_helper_back(world: None, guestkit: GuestKit,
                                                   state_dir: Path) -> None:
    machine = QemuVm(VmConfig(network=NetworkMode.NAT, ports=(PortMapping(free_port(), 8000),)),
                     kit=guestkit)
    machine.workdir = state_dir / machine.id
    await machine.start()
    again = machine
    try:
        os.killpg(int((machine.workdir / "net.pid").read_text()), signal.SIGKILL)
        await machine.detach()  # as a daemon does when it exits
        again = await QemuVm.attach(machine.id, workdir=machine.workdir, kit=guestkit)
        assert await connect(again, "other.test", WEB) == f"hello from {FAR}"  # DNS again
        assert "hello" not in await connect(again, "10.0.2.2", LOOPBACK_PORT)
        await test_published_ports_still_come_in(again)
    finally:
        await again.stop(force=True)
