"""Root disks of a chosen size, for real: a QEMU sandbox from the demo image with a 2 GiB
disk (``--disk 2g``). Its filesystem fills the disk; the host pays only for what the guest
writes (1 GiB written, about 1 GiB more on the host); a guest that fills the disk gets ENOSPC
and the host file stops at the disk's size. A fork given a bigger disk grows it while it
runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kelpie._fsutil import sparse_digest
from kelpie.guestkit import GuestKit
from kelpie.images import ImageStore
from kelpie.runtime import Runtime
from test_cli_e2e import DEMO
from vm_fixtures import demo_image_store, kelpie_state_dir, qemu_runtime

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

MIB = 1 << 20
DISK_MIB = 2048
GROWN_MIB = 3072


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from kelpie_state_dir("disk")


@pytest.fixture(scope="module")
def store(state_dir: Path) -> ImageStore:
    return demo_image_store(state_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(guestkit: GuestKit, state_dir: Path, store: ImageStore,
                  ) -> AsyncIterator[Runtime]:
    async with qemu_runtime(state_dir, store, guestkit) as rt:
        yield rt


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


async def _sh(rt: Runtime, script: str) -> tuple[int, str, str]:
    result = await rt.exec("disk", ["sh", "-c", script], timeout=300)
    return result.exit_code, result.stdout.decode(), result.stderr.decode()


async def test_a_disk_of_a_chosen_size_costs_what_is_written_and_no_more(
    runtime: Runtime,
) -> None:
    rt = runtime
    info = await rt.create(name="disk", backend="qemu", image=DEMO, disk_mib=DISK_MIB)
    assert info.config.disk_mib == DISK_MIB
    base = info.config.root_disk
    assert base is not None and base.stat().st_size == DISK_MIB * MIB
    assert _allocated(base) < 64 * MIB  # the image's files, not the disk's free space
    overlay = Path(info.vm_dir) / "overlay.qcow2"
    base_before = sparse_digest(base)

    code, out, err = await _sh(rt, "df -k / | tail -1")
    assert code == 0, err
    total_kib = int(out.split()[1])
    assert 0.9 * DISK_MIB * 1024 < total_kib <= DISK_MIB * 1024  # the fs fills the disk

    before = _allocated(overlay)
    code, _, err = await _sh(rt, "dd if=/dev/zero of=/root/half bs=1M count=1024 && sync")
    assert code == 0, err
    grown = _allocated(overlay) - before
    assert 1024 * MIB <= grown < 1088 * MIB  # what was written, plus qcow2's tables

    code, _, err = await _sh(rt, "dd if=/dev/zero of=/root/fill bs=1M; s=$?; sync; exit $s")
    assert code != 0 and "No space left on device" in err
    assert _allocated(overlay) < (DISK_MIB + 64) * MIB  # never past the disk's size
    assert sparse_digest(base) == base_before  # the image's disk is read-only to the guest
    code, _, err = await _sh(rt, "rm /root/fill /root/half && echo ok > /root/after")
    assert code == 0, err  # a full disk is not a broken sandbox


async def test_a_fork_given_a_bigger_disk_grows_it_while_it_runs(runtime: Runtime) -> None:
    rt = runtime
    (child,) = await rt.fork("disk", 1, disk_mib=GROWN_MIB)
    assert child.config.disk_mib == GROWN_MIB
    result = await rt.exec(child.id, ["sh", "-c", "df -k / | tail -1; cat /root/after"])
    assert result.exit_code == 0, result.stderr
    fields = result.stdout.decode().split()
    total_kib, available_kib = int(fields[1]), int(fields[3])
    assert 0.9 * GROWN_MIB * 1024 < total_kib <= GROWN_MIB * 1024  # the file system grew
    assert available_kib > DISK_MIB * 1024  # more room than the parent's whole disk
    assert fields[-1] == "ok"  # the parent's files, as they were at the fork
    parent = await rt.exec("disk", ["sh", "-c", "df -k / | tail -1"])
    assert int(parent.stdout.split()[1]) <= DISK_MIB * 1024  # the parent's disk is as it was
    await rt.remove(child.id, force=True)
