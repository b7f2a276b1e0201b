"""Fork for real: a running QEMU sandbox (the demo image, so it has a disk) into 4 children.

The parent runs a counter as its main command. Each child must go on counting from the
fork point, hold the parent's file, have its own host name and RNG; a child's writes are
seen by nobody else, and what the parent writes after the fork (to its disk and to its
memory: /tmp, a tmpfs) is seen by no child. The children share the capture's memory
copy-on-write: their RAM is a private mapping of the capture's RAM file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie.guestkit import GuestKit
from kelpie.images import ImageStore
from kelpie.runtime import Runtime
from kelpie.vm import GuestFileError, VmState
from test_cli_e2e import DEMO
from vm_fixtures import demo_image_store, kelpie_state_dir, qemu_runtime
from waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

# written by rename, so a fork (or a read) never catches the file empty between truncate
# and write
COUNTER = ("i=0; while :; do i=$((i+1)); echo $i > /root/count.new; "
           "mv /root/count.new /root/count; sleep 0.2; done")


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from kelpie_state_dir("fork")


@pytest.fixture(scope="module")
def store(state_dir: Path) -> ImageStore:
    return demo_image_store(state_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(guestkit: GuestKit, state_dir: Path, store: ImageStore,
                  ) -> AsyncIterator[Runtime]:
    async with qemu_runtime(state_dir, store, guestkit) as rt:
        yield rt


async def _count(rt: Runtime, ref: str) -> int:
    try:
        return int((await rt.read_file(ref, "/root/count")).strip() or b"0")
    except GuestFileError:  # not written yet
        return 0


async def _counted(rt: Runtime, ref: str, past: int) -> bool:
    return await _count(rt, ref) >= past


async def _out(rt: Runtime, ref: str, script: str) -> str:
    result = await rt.exec(ref, ["sh", "-c", script])
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode().strip()


async def test_four_children_go_on_from_the_fork_and_stay_apart(runtime: Runtime) -> None:
    rt = runtime
    await rt.create(name="p", backend="qemu", image=DEMO, memory_mib=384,
                    command=["sh", "-c", COUNTER])
    await wait_until(lambda: _counted(rt, "p", 3), 60, "the parent's counter")
    await rt.write_file("p", "/root/file", b"from the parent")
    at_fork = await _count(rt, "p")

    children = await rt.fork("p", 4)
    assert [c.name for c in children] == ["p-1", "p-2", "p-3", "p-4"]
    # after the fork: the parent's disk and memory (tmpfs) writes
    await rt.write_file("p", "/root/after", b"parent only")
    await _out(rt, "p", "echo mem > /tmp/m; echo disk >> /root/file")  # /tmp: a tmpfs
    parent_host = await _out(rt, "p", "hostname")

    hosts, randoms = {parent_host}, set()
    for child in children:
        assert child.state is VmState.RUNNING
        first = await _count(rt, child.id)
        assert first >= at_fork, "the child started before the fork point"
        await wait_until(lambda cid=child.id, past=first + 2: _counted(rt, cid, past), 60,
                         f"the counter going on in {child.name}")
        assert await rt.read_file(child.id, "/root/file") == b"from the parent"
        assert "No such file" in await _out(rt, child.id, "ls /root/after 2>&1 || true")
        assert await _out(rt, child.id, "cat /tmp/m 2>/dev/null || echo none") == "none"
        hosts.add(await _out(rt, child.id, "hostname"))
        randoms.add(await _out(rt, child.id, "head -c 16 /dev/urandom | od -An -tx1"))
    assert len(hosts) == 5 and len(randoms) == 4

    await rt.write_file(children[0].id, "/root/mine", b"child 1")
    for other in ("p", children[1].id):
        assert "No such file" in await _out(rt, other, "ls /root/mine 2>&1 || true")
    for child in children:
        vm_dir = rt.data_dir / "vms" / child.id
        launch = (vm_dir / "config.json").read_text()
        assert '"ram": "private"' in launch  # the capture's RAM, mapped copy-on-write
    assert not any((rt.data_dir / "forks").iterdir())
    for ref in [c.id for c in children] + ["p"]:
        await rt.remove(ref, force=True)
