"""The runtime driving a real QEMU VM: create, exec, files, console log, stop, remove.

Fails instead of skipping when KELPIE_REQUIRE_VM=1 (CI) and no VM can boot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie.guestkit import GuestKit
from kelpie.runtime import Runtime
from kelpie.vm import VmState

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
            assert rt.logs("real"), "the guest console log should not be empty"
            assert (await rt.stop("real")).state is VmState.STOPPED
        finally:
            await rt.remove("real", force=True)
        assert rt.list(all=True) == []
        assert not (state_dir / "vms" / info.id).exists()
