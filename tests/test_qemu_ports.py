"""Published ports and host-checked shares on the QEMU backend.

The first tests check the command line and the checks made before QEMU starts (no VM);
the ``vm`` tests boot real guests (TCG here) and fail instead of skipping when
qemu is in KELPIE_REQUIRE_BACKENDS (CI) and no VM can boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie import BootError, ConfigError, Mount, NetworkMode, VmConfig, VmState
from kelpie.backends.qemu._cmdline import (
    QemuLaunch,
    build_command,
    kernel_args,
    netdev_arg,
)
from kelpie.backends.qemu._host import start_failure_reason
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit
from kelpie.vm import PortMapping

GUEST_PORT = 8000
GUEST_ECHO_SERVER = (
    # An upper-casing echo server on GUEST_PORT; prints "ready" once it listens.
    f"nc -ll -p {GUEST_PORT} -e tr a-z A-Z & "
    f"while ! netstat -ltn | grep -q ':{GUEST_PORT} '; do sleep 0.05; done; echo ready; wait"
)


def launch(config: VmConfig) -> QemuLaunch:
    return QemuLaunch(qemu="qemu-system-x86_64", config=config, kernel=Path("/k"),
                      initrd=Path("/i"), workdir=Path("/w"), accel="tcg", hostname="h")


def option(command: list[str], name: str) -> list[str]:
    """Every value given to ``name`` in ``command``."""
    return [value for opt, value in itertools.pairwise(command) if opt == name]


# ---- command line -------------------------------------------------------------------------


def test_network_none_without_ports_has_no_nic() -> None:
    command = build_command(launch(VmConfig()))
    assert option(command, "-netdev") == []
    assert not any(value.startswith("virtio-net") for value in option(command, "-device"))
    assert "kelpie.net=" not in kernel_args(launch(VmConfig()))


def test_network_none_with_ports_gets_a_restricted_nic() -> None:
    config = VmConfig(ports=(PortMapping(8080, 80),
                             PortMapping(5353, 53, host_ip="0.0.0.0", protocol="udp")))
    command = build_command(launch(config))
    assert option(command, "-netdev") == [
        "user,id=net0,restrict=on,"
        "hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,hostfwd=udp:0.0.0.0:5353-10.0.2.15:53"
    ]
    assert "virtio-net-device,netdev=net0" in option(command, "-device")
    # an address for the forwarded connections, but no route or DNS server out
    assert "kelpie.net=10.0.2.15/24" in kernel_args(launch(config)).split()


def test_nat_with_ports_forwards_without_restriction() -> None:
    config = VmConfig(network=NetworkMode.NAT, ports=(PortMapping(8080, 80),))
    assert netdev_arg(config) == "user,id=net0,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80"
    assert "kelpie.net=10.0.2.15/24,10.0.2.2,10.0.2.3" in kernel_args(launch(config)).split()
    assert netdev_arg(VmConfig(network=NetworkMode.NAT)) == "user,id=net0"


def test_read_only_share_is_read_only_in_qemu() -> None:
    config = VmConfig(mounts=(Mount(Path("/src"), "/ro", read_only=True),
                              Mount(Path("/data"), "/rw")))
    fsdevs = option(build_command(launch(config)), "-fsdev")
    assert fsdevs == [
        "local,id=fs0,path=/src,security_model=none,readonly=on",
        "local,id=fs1,path=/data,security_model=none",
    ]


def test_port_bind_failure_is_explained(tmp_path: Path) -> None:
    assert start_failure_reason(tmp_path) is None  # no log at all
    (tmp_path / "qemu.log").write_text(
        "qemu-system-x86_64: -netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:"
        "42467-10.0.2.15:80: Could not set up host forwarding rule "
        "'tcp:127.0.0.1:42467-10.0.2.15:80'\n"
    )
    reason = start_failure_reason(tmp_path)
    assert reason is not None
    assert "cannot publish host port 127.0.0.1:42467/tcp" in reason
    assert "could not bind" in reason and "already in use" in reason
    (tmp_path / "qemu.log").write_text("qemu-system-x86_64: something else\n")
    assert start_failure_reason(tmp_path) is None


async def test_missing_share_fails_before_qemu_starts(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    config = VmConfig(mounts=(Mount(tmp_path / "gone", "/a"), Mount(a_file, "/b"),
                              Mount(tmp_path, "/c")))
    with tempfile.TemporaryDirectory(prefix="kp-") as workdir:  # short: socket paths
        machine = QemuVm(config, workdir=Path(workdir), qemu="/nonexistent/qemu")
        with pytest.raises(ConfigError) as info:
            await machine.start()
    first, second = info.value.problems
    assert "mounts[0].host_path" in first and "does not exist" in first
    assert "mounts[1].host_path" in second and "is not a directory" in second
    assert machine.state is VmState.STOPPED


# ---- real VMs -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def request(port: int, data: bytes, deadline: float) -> bytes:
    """Send ``data`` to 127.0.0.1:``port``, half-close, read the reply to EOF.

    Retries until a non-empty reply or ``deadline``: QEMU accepts the host side at once
    and closes it empty while nothing listens in the guest yet.
    """
    while True:
        reply = b""
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(data)
                await writer.drain()
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if reply or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def guest_echo_server(machine: QemuVm) -> AsyncIterator[None]:
    """The guest's echo server on GUEST_PORT, up (it said "ready") for the block's length."""
    async with machine.exec_stream(["sh", "-c", GUEST_ECHO_SERVER]) as proc:
        output = b""
        async with asyncio.timeout(30):
            async for event in proc:
                output += getattr(event, "data", b"")
                if b"ready" in output:
                    break
        assert b"ready" in output, output
        yield


@contextlib.asynccontextmanager
async def host_listener() -> AsyncIterator[tuple[int, list[str]]]:
    """A server on 127.0.0.1 that says "hi" and records each connection; (port, peers)."""
    peers: list[str] = []

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(str(writer.get_extra_info("peername")))
        writer.write(b"hi\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], peers


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    path = Path(f"/tmp/kelpie-ports-{os.getpid()}")  # short: unix socket paths live here
    path.mkdir(exist_ok=True)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def new_vm(kit: GuestKit, state_dir: Path, **config: object) -> QemuVm:
    vm = QemuVm(VmConfig(**config), kit=kit)  # type: ignore[arg-type]
    vm.workdir = state_dir / vm.id
    return vm


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ro-share")
    (path / "from-host").write_text("host data\n")
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def isolated_vm(guestkit: GuestKit, state_dir: Path,
                      read_only_dir: Path) -> AsyncIterator[QemuVm]:
    """Network ``none``, one published port, one read-only share."""
    machine = new_vm(guestkit, state_dir, ports=(PortMapping(free_port(), GUEST_PORT),),
                     mounts=(Mount(read_only_dir, "/ro", read_only=True),))
    await machine.start()
    yield machine
    await machine.stop(force=True)


@pytest.mark.vm
@pytest.mark.asyncio(loop_scope="module")
async def test_published_port_reaches_the_guest_with_network_none(isolated_vm: QemuVm) -> None:
    (port,) = isolated_vm.config.ports
    async with guest_echo_server(isolated_vm):
        reply = await request(port.host_port, b"ping from host\n", time.monotonic() + 30)
        assert reply == b"PING FROM HOST\n"
        again = await request(port.host_port, b"twice\n", time.monotonic() + 30)
        assert again == b"TWICE\n"
    addr = await isolated_vm.exec(["ip", "-4", "addr", "show", "eth0"])
    assert b"10.0.2.15/24" in addr.stdout
    routes = await isolated_vm.exec(["ip", "route"])
    assert b"default" not in routes.stdout, routes.stdout


@pytest.mark.vm
@pytest.mark.asyncio(loop_scope="module")
async def test_network_none_guest_cannot_reach_host_or_outside(isolated_vm: QemuVm) -> None:
    async with host_listener() as (host_port, peers):
        # The guest is root: even with a route of its own, QEMU's restrict=on drops it all.
        script = (
            "ip route add default via 10.0.2.2 2>/dev/null; "
            f"nc -w 3 10.0.2.2 {host_port} </dev/null; echo host=$?; "
            "nc -w 3 1.1.1.1 80 </dev/null; echo outside=$?"
        )
        result = await isolated_vm.exec(["sh", "-c", script], timeout=60)
        await isolated_vm.exec(["ip", "route", "del", "default"])
    assert b"hi" not in result.stdout and peers == [], (result.stdout, peers)
    assert b"host=0" not in result.stdout and b"outside=0" not in result.stdout, result.stdout


@pytest.mark.vm
@pytest.mark.asyncio(loop_scope="module")
async def test_read_only_share_is_enforced_by_the_host(isolated_vm: QemuVm,
                                                      read_only_dir: Path) -> None:
    read = await isolated_vm.exec(["cat", "/ro/from-host"])
    assert read.stdout == b"host data\n"
    # root in the guest can remount the share read-write; QEMU still refuses the write
    attempt = await isolated_vm.exec(
        ["sh", "-c", "mount -o remount,rw /ro; echo x > /ro/written; echo status=$?"]
    )
    assert b"status=0" not in attempt.stdout, attempt
    assert not (read_only_dir / "written").exists()


@pytest.mark.vm
@pytest.mark.asyncio(loop_scope="module")
async def test_nat_publishes_ports_but_never_reaches_the_host(guestkit: GuestKit,
                                                              state_dir: Path) -> None:
    machine = new_vm(guestkit, state_dir, network=NetworkMode.NAT,
                     ports=(PortMapping(free_port(), GUEST_PORT),))
    await machine.start()
    try:
        (port,) = machine.config.ports
        async with guest_echo_server(machine):
            reply = await request(port.host_port, b"over nat\n", time.monotonic() + 30)
        assert reply == b"OVER NAT\n"
        # nat runs QEMU in the sandbox's own namespace: the host's loopback is not its
        # (test_qemu_egress.py tries every other way to the host)
        async with host_listener() as (host_port, peers):
            result = await machine.exec(
                ["sh", "-c", f"nc -w 3 10.0.2.2 {host_port} </dev/null"], timeout=60
            )
        assert result.stdout == b"" and peers == [], (result, peers)
    finally:
        await machine.stop()


@pytest.mark.vm
@pytest.mark.asyncio(loop_scope="module")
async def test_host_port_in_use_fails_the_start_clearly(guestkit: GuestKit,
                                                        state_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        machine = new_vm(guestkit, state_dir, ports=(PortMapping(port, GUEST_PORT),))
        with pytest.raises(BootError) as info:
            await machine.start()
    message = str(info.value)
    assert f"cannot publish host port 127.0.0.1:{port}/tcp" in message, message
    assert "could not bind" in message
    assert machine.state is VmState.STOPPED
