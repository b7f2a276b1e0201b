"""The runtime driving a real QEMU VM: create, exec, files, console log, stop, remove.

Fails instead of skipping when qemu is in KELPIE_REQUIRE_BACKENDS (CI) and no VM can boot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie.guestkit import GuestKit
from kelpie.runtime import Runtime
from kelpie.vm import VmState
from waiting import wait_until

pytestmark = pytest.mark.vm


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # short, because unix socket paths live under it; the QEMU backend finds VM
    # directories through KELPIE_STATE_DIR, so the runtime's data dir is the same place
    path = Path(f"/tmp/kelpie-rt-{os.getpid()}")
    path.mkdir(exist_ok=True)
    monkeypatch.setenv("KELPIE_STATE_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_qemu_sandbox_through_the_runtime(guestkit: GuestKit, state_dir: Path) -> None:
    async with Runtime(data_dir=state_dir, backend_options={"qemu": {"kit": guestkit}}) as rt:
        info = await rt.create(name="real", backend="qemu", env={"FROM_SANDBOX": "yes"})
        try:
            assert info.state is VmState.RUNNING
            assert info.vm_dir == state_dir / "vms" / info.id
            result = await rt.exec("real", ["sh", "-c", "echo $FROM_SANDBOX; uname -s"])
            assert (result.exit_code, result.stdout) == (0, b"yes\nLinux\n")
            await rt.write_file("real", "/tmp/note", b"through the runtime")
            assert await rt.read_file(info.id[:6], "/tmp/note") == b"through the runtime"
            assert (await rt.read_logs("real")), "the guest console log should not be empty"
            assert (await rt.stop("real")).state is VmState.STOPPED
        finally:
            await rt.remove("real", force=True)
        assert (await rt.list_sandboxes(all=True)) == []
        assert not (state_dir / "vms" / info.id).exists()


async def test_template_clones_are_distinct_and_fast_to_start(
    guestkit: GuestKit, state_dir: Path,
) -> None:
    """4 clones of one template, started concurrently: 4 hostnames, 4 RNG states."""
    async with Runtime(data_dir=state_dir, backend_options={"qemu": {"kit": guestkit}}) as rt:
        template = await rt.create_template(name="base", backend="qemu", memory_mib=256)
        assert template.template and (await rt.list_sandboxes(all=True)) == []
        clones = await asyncio.gather(*(rt.create(template="base", name=f"clone{i}")
                                         for i in range(4)))
        try:
            hostnames, randoms = set(), set()
            for clone in clones:
                assert clone.state is VmState.RUNNING
                script = "hostname; head -c 16 /dev/urandom | od -An -tx1"
                result = await rt.exec(clone.id, ["sh", "-c", script])
                assert result.exit_code == 0, result.stderr
                hostname, random = result.stdout.decode().split("\n", 1)
                hostnames.add(hostname)
                randoms.add(random.strip())
            assert len(hostnames) == 4 and len(randoms) == 4
        finally:
            for clone in clones:
                await rt.remove(clone.id, force=True)
            await rt.delete_snapshot("base")


async def test_snapshot_restore_through_the_runtime(guestkit: GuestKit, state_dir: Path) -> None:
    async with Runtime(data_dir=state_dir, backend_options={"qemu": {"kit": guestkit}}) as rt:
        await rt.create(name="src", backend="qemu", memory_mib=256)
        try:
            await rt.write_file("src", "/tmp/before", b"kept")
            snap = await rt.snapshot("src", name="s")
            assert snap.size > 0 and (await rt.inspect("src")).state is VmState.RUNNING
            await rt.write_file("src", "/tmp/after", b"not kept")
            copy = await rt.restore("s", name="copy")
            assert copy.id != snap.sandbox_id
            assert await rt.read_file("copy", "/tmp/before") == b"kept"
            missing = await rt.exec("copy", ["test", "-e", "/tmp/after"])
            assert missing.exit_code == 1
        finally:
            for info in await rt.list_sandboxes(all=True):
                await rt.remove(info.id, force=True)


async def test_main_command_output_is_followed_after_a_restart(
    guestkit: GuestKit, state_dir: Path,
) -> None:
    """A new runtime (a restarted daemon) takes over the main command's output and exit."""
    script = "echo before; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo after; exit 3"
    options = {"qemu": {"kit": guestkit}}
    async with Runtime(data_dir=state_dir, backend_options=options) as first:
        info = await first.create(name="svc", backend="qemu", memory_mib=256,
                                  command=["sh", "-c", script])
        # the pump writes as output arrives
        async def first_line() -> bool:
            return await first.read_logs("svc") == b"before\n"

        await wait_until(first_line, 30, "the main's first line")
        assert (await first.inspect("svc")).main_exec_id is not None
    async with Runtime(data_dir=state_dir, backend_options=options) as second:
        try:
            again = await second.inspect("svc")
            assert again.state is VmState.RUNNING, again.crash_reason
            await second.exec("svc", ["touch", "/tmp/go"])
            assert await second.wait_main("svc") == 3
            assert (await second.read_logs("svc")) == b"before\nafter\n"
            assert (await second.inspect("svc")).main_exec_id is None
        finally:
            await second.remove(info.id, force=True)


async def test_template_clones_keep_their_egress_rules(guestkit: GuestKit,
                                                       state_dir: Path) -> None:
    """A template made with rules gives them to its clones, enforced in each one's own
    network namespace (test_qemu_egress.py shows what the rules do to traffic)."""
    from kelpie.hostnet._netns import find, key_of

    async with Runtime(data_dir=state_dir, backend_options={"qemu": {"kit": guestkit}}) as rt:
        await rt.create_template(name="fenced", backend="qemu", memory_mib=256,
                                 network="policy", allow=["198.51.100.9:80"])
        clone = await rt.create(template="fenced", name="clone")
        try:
            assert clone.config.network.value == "policy"
            assert [str(r) for r in clone.config.egress.allow] == ["198.51.100.9/32:80"]
            assert clone.vm_dir is not None
            netns = find(key_of(clone.vm_dir))
            assert netns is not None
            listing = await asyncio.create_subprocess_exec(
                *netns.exec_prefix(), "nft", "list", "ruleset", stdout=asyncio.subprocess.PIPE)
            rules = (await listing.communicate())[0].decode()
            assert "ip daddr 198.51.100.9 meta l4proto { tcp, udp } th dport 80 accept" in rules
        finally:
            await rt.remove("clone", force=True)
            await rt.delete_snapshot("fenced", template=True)
        assert find(key_of(clone.vm_dir)) is None
