"""Docker's flags and commands against a real QEMU sandbox (the demo image): hostname,
workdir and labels as given, a failing main command restarted by on-failure:3 (the guest
counts each run), stats checked against a known load (MiB written, seconds of CPU burned,
MiB sent to a published port), the guest's processes, and the event log; a signal to a
main command, and a VM killed under its sandbox booted again by its restart policy; a
commit, and a sandbox started from the committed image."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import signal
import socket
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie.api import SandboxStats
from kelpie.guestkit import GuestKit
from kelpie.images import ImageStore
from kelpie.runtime import EventKind, Runtime
from kelpie.vm import VmState
from test_cli_e2e import DEMO
from test_qemu_ports import free_port
from vm_fixtures import demo_image_store, kelpie_state_dir, qemu_runtime
from waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

MIB = 1 << 20
BURN_SECONDS = 2.0
SENT_MIB = 8
HOST_PORT = free_port()


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from kelpie_state_dir("docker")


@pytest.fixture(scope="module")
def store(state_dir: Path) -> ImageStore:
    return demo_image_store(state_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(guestkit: GuestKit, state_dir: Path, store: ImageStore,
                  ) -> AsyncIterator[Runtime]:
    async with qemu_runtime(state_dir, store, guestkit) as rt:
        await rt.create(name="dock", backend="qemu", image=DEMO, disk_mib=1024,
                        hostname="web1", workdir="/tmp", labels={"team": "ml"},
                        restart="on-failure:3", ports=[f"127.0.0.1:{HOST_PORT}:8000"],
                        command=["sh", "-c", "echo run >> runs; exit 3"])
        yield rt


async def _sh(rt: Runtime, script: str) -> str:
    result = await rt.exec("dock", ["sh", "-c", script], timeout=120)
    assert result.exit_code == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_flags_shape_the_guest(runtime: Runtime) -> None:
    assert await _sh(runtime, "hostname; pwd") == "web1\n/tmp\n"
    info = await runtime.inspect("dock")
    assert (dict(info.labels), info.workdir) == ({"team": "ml"}, "/tmp")


async def test_on_failure_3_runs_a_failing_main_command_four_times(runtime: Runtime) -> None:
    assert await runtime.wait_main("dock") == 3
    info = await runtime.inspect("dock")
    assert (info.restart_count, info.main_exit_code) == (3, 3)
    assert await _sh(runtime, "cat /tmp/runs") == "run\n" * 4  # counted by the guest itself
    restarts = [e for e in await runtime.events("dock") if e.kind is EventKind.RESTARTED]
    assert [e.reason for e in restarts] == [
        f"exit code 3; restart {n} (on-failure:3) after {delay:g} s"
        for n, delay in ((1, 0.1), (2, 0.2), (3, 0.4))]
    watched = [e async for e in runtime.watch_events(since=0, until=time.time(),
                                                       sandboxes=["dock"],
                                                       kinds=["main-exited"])]
    assert [e.reason for e in watched] == ["exit code 3"] * 4


async def test_stats_follow_a_known_load(runtime: Runtime) -> None:
    before = await runtime.stats("dock")
    assert before.guest is not None and before.host is not None, before.guest_error
    assert before.disk_limit_bytes == 1024 * MIB and not before.disk_full
    assert 900 * MIB < before.guest.disk_total_bytes <= 1024 * MIB
    await _sh(runtime, "dd if=/dev/zero of=/root/blob bs=1M count=64 2>/dev/null && sync")
    # Busy for BURN_SECONDS of the guest's own clock (date is the guest's).
    await _sh(runtime, f"end=$(( $(date +%s) + {int(BURN_SECONDS)} + 1 )); "
                       "while [ $(date +%s) -lt $end ]; do :; done")
    after = await runtime.stats("dock")
    assert after.guest is not None and after.host is not None, after.guest_error

    written = after.guest.disk_used_bytes - before.guest.disk_used_bytes
    assert 64 * MIB <= written < 72 * MIB  # the file, plus the file system's own blocks
    host_written = after.host.disk_bytes - before.host.disk_bytes
    assert 64 * MIB <= host_written < 80 * MIB  # the overlay grew by what was written
    burned = after.guest.cpu_seconds - before.guest.cpu_seconds
    elapsed = after.guest.uptime_seconds - before.guest.uptime_seconds
    assert BURN_SECONDS <= burned <= elapsed * after.guest.cpus
    assert after.host.cpu_seconds - before.host.cpu_seconds >= BURN_SECONDS  # QEMU's own
    assert after.host.memory_bytes > 64 * MIB  # the guest's touched RAM lives in QEMU
    assert 0 < after.guest.memory_used_bytes < after.guest.memory_total_bytes
    (listed,) = [s for s in await runtime.stats_all() if s.name == "dock"]
    assert isinstance(listed, SandboxStats) and listed.guest is not None


async def test_top_lists_the_guests_processes(runtime: Runtime) -> None:
    await runtime.exec_detached("dock", ["sleep", "300"])
    listing = await runtime.processes("dock")
    sleeps = [p for p in listing.processes if p.command == ["sleep", "300"]]
    assert len(sleeps) == 1 and sleeps[0].state in "RS"
    assert abs(sleeps[0].started_at - time.time()) < 120
    assert any(p.pid == 1 for p in listing.processes)
    assert not listing.truncated
    await _sh(runtime, "kill $(pidof sleep)")


async def test_a_full_disk_is_reported(runtime: Runtime) -> None:
    filled = await runtime.exec("dock", ["sh", "-c", "dd if=/dev/zero of=/root/fill bs=1M"],
                                timeout=300)
    assert filled.exit_code != 0 and b"No space left on device" in filled.stderr
    stats = await runtime.stats("dock")
    assert stats.disk_full
    warning = await runtime.disk_full("dock")
    assert warning is not None and "root disk of sandbox dock" in warning
    await _sh(runtime, "rm /root/fill")
    assert await runtime.disk_full("dock") is None
    assert not (await runtime.stats("dock")).disk_full


def _send(size: int) -> None:
    with socket.create_connection(("127.0.0.1", HOST_PORT), timeout=60) as sock:
        sock.sendall(b"x" * size)


async def test_network_counters_follow_real_traffic(runtime: Runtime) -> None:
    await runtime.exec_detached("dock", ["sh", "-c", "nc -l -p 8000 > /dev/null"])
    await _sh(runtime, "while ! netstat -ltn | grep -q ':8000 '; do sleep 0.05; done")
    before = await runtime.stats("dock")
    await asyncio.to_thread(_send, SENT_MIB * MIB)
    await _sh(runtime, "while pidof nc > /dev/null; do sleep 0.05; done")  # all received
    after = await runtime.stats("dock")
    assert before.guest is not None and after.guest is not None
    received = after.guest.net_rx_bytes - before.guest.net_rx_bytes
    assert SENT_MIB * MIB <= received < SENT_MIB * MIB * 1.15  # the bytes, plus headers
    assert 0 < after.guest.net_tx_bytes - before.guest.net_tx_bytes < MIB  # ACKs


async def test_a_signal_and_a_killed_vm_restart_as_the_policy_says(runtime: Runtime) -> None:
    rt = runtime
    info = await rt.create(name="phoenix", backend="qemu", image=DEMO, restart="always",
                           command=["sh", "-c", "echo up >> /root/boots; sync; "
                                                "exec sleep 100000"])
    restarted = rt.watch_events(sandboxes=["phoenix"], kinds=["restarted"])

    async def started(times: int) -> bool:
        """The main command has started ``times`` times (each start writes a line) and
        synced its line (it runs sleep only after the sync)."""
        boots = await rt.exec("phoenix", ["cat", "/root/boots"])
        listing = await rt.processes("phoenix")
        synced = any(p.command == ["sleep", "100000"] for p in listing.processes)
        return boots.stdout == b"up\n" * times and synced

    await wait_until(lambda: started(1), 120, "the main command to start")
    await rt.kill("phoenix", signal="TERM")  # to the main command: it ends, always restarts
    event = await asyncio.wait_for(anext(restarted), 120)
    assert event.reason is not None and event.reason.startswith("exit code 143; restart 1")
    assert (await rt.inspect("phoenix")).state is VmState.RUNNING
    await wait_until(lambda: started(2), 120, "the main command to start again")

    assert info.vm_dir is not None
    qemu = int((Path(info.vm_dir) / "qemu.pid").read_text())
    os.kill(qemu, signal.SIGKILL)  # the VM dies under the sandbox
    event = await asyncio.wait_for(anext(restarted), 120)
    assert event.reason is not None and event.reason.startswith("VM crashed (")
    again = await rt.inspect("phoenix")
    assert (again.state, again.restart_count) == (VmState.RUNNING, 2)
    states = [e.state for e in await rt.events("phoenix") if e.kind is EventKind.STATE]
    assert VmState.CRASHED in states
    # booted again, its main command too; the disk (synced lines) outlived the killed VM
    await wait_until(lambda: started(3), 120, "the main command after the crash")
    await restarted.aclose()
    await rt.remove("phoenix", force=True)


async def test_commit_then_start_a_sandbox_from_the_image(runtime: Runtime) -> None:
    rt = runtime
    await _sh(rt, "rm -f /root/blob; mkdir -p /opt/app && echo 'echo committed' > "
                  "/opt/app/hello.sh && chmod 750 /opt/app/hello.sh && "
                  "ln -s hello.sh /opt/app/run && rm /etc/os-release")
    base = rt.images.get((await rt.inspect("dock")).image_digest or "")
    made = await rt.commit("dock", "local/committed:1", message="with hello")
    assert made.tags == ("docker.io/local/committed:1",)
    assert made.manifest.layers[:-1] == base.manifest.layers  # one layer on top
    assert (made.config.working_dir, made.config.cmd) == (
        "/tmp", ("sh", "-c", "echo run >> runs; exit 3"))  # the sandbox's, carried over
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(
            rt.images.blobs.read_bytes(made.manifest.layers[-1].digest)))) as layer:
        members = {m.name: m for m in layer.getmembers()}
    assert members["opt/app/hello.sh"].mode == 0o750
    assert members["opt/app/run"].issym() and members["opt/app/run"].linkname == "hello.sh"
    assert "etc/.wh.os-release" in members  # the deletion, as a whiteout
    assert not {"etc/hosts", "etc/hostname", "etc/resolv.conf"} & set(members)
    assert not any(name.startswith(("proc/", "dev/", "tmp/")) for name in members)

    await rt.create(name="from-commit", backend="qemu", image="local/committed:1")
    ran = await rt.exec("from-commit", ["sh", "-c", "sh /opt/app/run; stat -c %a "
                                        "/opt/app/hello.sh; test -e /etc/os-release || "
                                        "echo gone"])
    assert ran.stdout == b"committed\n750\ngone\n", ran.stderr
    await rt.remove("from-commit", force=True)
