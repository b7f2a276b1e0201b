"""The vz backend over the fake framework, as the backend behaviour suite builds it.

``VZ_FAKE_SPEC`` is a backend ("vz-fake") whose VMs are :class:`VzVm` objects on a
:class:`~fake_virtualization.FakeHost` (macOS 14: full snapshots too): everything of the
backend but Apple's framework and the guest kernel. ``vz_fake`` builds its VMs for the
suite; register both in ``backend_fixtures.py`` (``SUITE_DOUBLES`` and ``BUILDERS``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fake_virtualization import FakeHost
from kelpie.backends.vz import CAPABILITIES
from kelpie.backends.vz._vm import VzVm
from kelpie.guestkit import GuestKit
from kelpie.vm import BackendSpec, ProbeResult, VmInstance

if TYPE_CHECKING:
    from backend_fixtures import BackendUnderTest

CRASH_MESSAGE = "Internal Virtualization error. The virtual machine stopped unexpectedly."


class FakeVzVm(VzVm):
    """A VzVm under its own backend name, so the suite tells it from a real vz."""

    backend_name = "vz-fake"


def _probe() -> ProbeResult:
    if shutil.which("busybox") is None:
        return ProbeResult(False, "busybox (static) is needed for the stand-in guest's root")
    return ProbeResult(True, "the vz backend over a fake framework (a test double)")


VZ_FAKE_SPEC = BackendSpec(
    name="vz-fake",
    description="the vz backend over a fake Virtualization.framework (suite only)",
    capabilities=CAPABILITIES, probe=_probe, create=FakeVzVm, real=False,
)


def fake_kit(where: Path) -> GuestKit:
    """A guest kit of placeholder files: the fake framework only checks they exist."""
    where.mkdir(parents=True, exist_ok=True)
    kernel, initrd = where / "vmlinux", where / "initrd.cpio"
    kernel.write_bytes(b"not a kernel: the fake framework boots a stand-in guest\n")
    initrd.write_bytes(b"not an initrd\n")
    digest = "sha256:" + hashlib.sha256(kernel.read_bytes() + initrd.read_bytes()).hexdigest()
    return GuestKit(kernel, initrd, digest, versions={}, sizes={})


def raw_disk(where: Path) -> Path:
    """A small raw disk image (the stand-in guest does not read it; the VM copies it)."""
    disk = where / "base.img"
    disk.write_bytes(b"\0" * 65536)
    return disk


def vz_fake(spec: BackendSpec, request: pytest.FixtureRequest, where: Path) -> BackendUnderTest:
    """The behaviour suite's recipe: VMs on one fake Mac (macOS 14), a raw root disk."""
    from backend_fixtures import BackendUnderTest  # not at the top: it imports this module

    host = FakeHost(where / "mac")
    request.addfinalizer(host.shutdown)
    kit = fake_kit(where / "kit")

    def place(vm: VmInstance) -> None:
        vm.workdir = where / vm.id  # type: ignore[attr-defined]  # socket paths stay short

    async def kill(vm: VmInstance) -> str:
        host.crash(host.machine_of(vm.workdir), CRASH_MESSAGE)  # type: ignore[attr-defined]
        return "stopped unexpectedly"

    return BackendUnderTest(spec, config={"root_disk": raw_disk(where)},
                            options=lambda: {"framework": host.framework(), "kit": kit},
                            kill=kill, place=place)
