"""How the backend behaviour suite builds (and kills) VMs of each registered backend.

This is the one place of the suite that names backends: a table of what a backend needs
beyond ``spec.create(VmConfig(...))`` (QEMU: the guest kit, a short VM directory, a root
disk) and how to make one of its VMs die underneath the VM object, as a crashed VMM
would. A backend missing from the table is still tested: it is built with its spec alone,
and the crash test skips for it until the table says how to kill one of its VMs.

``SUITE_DOUBLES`` adds backends that only this suite runs: a mock that declares no optional
capability, so that the suite's own "assert UnsupportedOperation instead" branches run on
every host, not only once a backend lacking something is registered; and the backends whose
hypervisor this host lacks, each driven through its real VM class against a stand-in of its
VMM that runs Kelpie's real guest agent on the host (``firecracker-fake``: see
``fake_firecracker.py``; ``libkrun-standin``: see ``libkrun_standin.py``; ``vz-fake``:
see ``fake_virtualization.py``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kelpie.backends.firecracker import CAPABILITIES as FIRECRACKER_CAPABILITIES
from kelpie.backends.firecracker._vm import FirecrackerVm
from kelpie.backends.mock import MockVm
from kelpie.guestkit import GuestKit
from kelpie.sim import Fault, FaultInjector, SimRng
from kelpie.vm import (
    BackendSpec,
    Capabilities,
    ProbeResult,
    VmConfig,
    VmCrashed,
    VmInstance,
)
from libkrun_standin import LIBKRUN_STANDIN_SPEC, libkrun_standin
from vm_fixtures import BASE_APPLETS, busybox_root_disk
from vz_fake_backend import VZ_FAKE_SPEC, vz_fake

Kill = Callable[[VmInstance], Awaitable[str]]
"""Make a running VM die underneath its VM object; return a piece of text the VM's
``crash_reason`` must then contain."""


@dataclasses.dataclass
class BackendUnderTest:
    """One registered backend, as the suite drives it."""

    spec: BackendSpec
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Config fields every VM of this backend gets here (a root disk, say)."""
    options: Callable[[], dict[str, Any]] = dict
    """Keyword options for ``spec.create``, fresh for each VM."""
    kill: Kill | None = None
    place: Callable[[VmInstance], None] = lambda vm: None
    """Called on each new VM before it starts (QEMU: put its directory somewhere short)."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capabilities(self) -> Capabilities:
        return self.spec.capabilities

    def new_vm(self, **config: Any) -> VmInstance:
        """An unstarted VM of this backend; ``config`` adds VmConfig fields."""
        vm = self.spec.create(VmConfig(**{**self.config, **config}), **self.options())
        self.place(vm)
        return vm


class _CrashSwitch(FaultInjector):
    """A fault injector that crashes the mock VM at its next guest operation, once armed."""

    def __init__(self) -> None:
        super().__init__(SimRng(0))
        self.armed = False

    def check(self, fault: Fault, operation: str) -> bool:
        if fault is Fault.CRASH and self.armed:
            self.armed = False
            return True
        return False


def _mock(spec: BackendSpec, request: pytest.FixtureRequest, where: Path) -> BackendUnderTest:
    made: list[_CrashSwitch] = []  # the switch of the VM being created, until place() runs
    switches: dict[str, _CrashSwitch] = {}

    def options() -> dict[str, Any]:
        made.append(_CrashSwitch())
        return {"faults": made[-1]}

    def place(vm: VmInstance) -> None:
        switches[vm.id] = made.pop()

    async def kill(vm: VmInstance) -> str:
        # The mock has no VMM process to kill: its crash surfaces at the next operation.
        switches[vm.id].armed = True
        with pytest.raises(VmCrashed):
            await vm.exec(["true"])
        return "(injected)"

    return BackendUnderTest(spec, options=options, kill=kill, place=place)


GUEST_APPLETS = (*BASE_APPLETS, "env", "printf", "rm", "true", "false", "tty", "stty", "pwd")


def _kit_booted(spec: BackendSpec, request: pytest.FixtureRequest, where: Path) -> BackendUnderTest:
    kit = request.getfixturevalue("guestkit")
    disk_dir = where / "disk"
    disk_dir.mkdir(exist_ok=True)
    root_disk = busybox_root_disk(disk_dir, GUEST_APPLETS)

    def place(vm: VmInstance) -> None:
        vm.workdir = where / vm.id  # type: ignore[attr-defined]  # socket paths stay short

    async def kill(vm: VmInstance) -> str:
        pid = vm.pid  # type: ignore[attr-defined]
        assert pid is not None, "the VM has no QEMU process to kill"
        os.kill(pid, signal.SIGKILL)
        return f"status -{signal.SIGKILL}"

    return BackendUnderTest(spec, config={"root_disk": root_disk},
                            options=lambda: {"kit": kit}, kill=kill, place=place)


class _BareMockVm(MockVm):
    """A mock VM without pause, snapshots, PTY or any other optional capability."""

    backend_name = "bare-mock"
    capabilities = Capabilities()


class _FakeFirecrackerVm(FirecrackerVm):
    """FirecrackerVm itself, under its own name, for the stand-in Firecracker."""

    backend_name = "firecracker-fake"


def _firecracker_fake(spec: BackendSpec, request: pytest.FixtureRequest,
                      where: Path) -> BackendUnderTest:
    """FirecrackerVm driving ``fake_firecracker.py`` (the guest kernel is all it lacks)."""
    tests = Path(__file__).resolve().parent
    binary = where / "firecracker"
    binary.write_text(f"#!/bin/sh\nPYTHONPATH={tests.parent / 'src'}:{tests} exec "
                      f"{sys.executable} {tests / 'fake_firecracker.py'} \"$@\"\n")
    binary.chmod(0o755)
    for name in ("vmlinux", "initrd.img", "image.ext4"):
        (where / name).write_bytes(b"not booted by the stand-in\n")
    kit = GuestKit(kernel=where / "vmlinux", initrd=where / "initrd.img", digest="stand-in",
                   versions={}, sizes={})

    def place(vm: VmInstance) -> None:
        vm.workdir = where / vm.id  # type: ignore[attr-defined]  # socket paths stay short

    async def kill(vm: VmInstance) -> str:
        pid = vm.pid  # type: ignore[attr-defined]
        assert pid is not None, "the VM has no Firecracker process to kill"
        os.kill(pid, signal.SIGKILL)
        return f"status -{signal.SIGKILL}"

    return BackendUnderTest(spec, config={"root_disk": where / "image.ext4"},
                            options=lambda: {"kit": kit, "firecracker": str(binary)},
                            kill=kill, place=place)


SUITE_DOUBLES = {
    "bare-mock": BackendSpec(
        name="bare-mock", description="a mock declaring no optional capability (suite only)",
        capabilities=_BareMockVm.capabilities,
        probe=lambda: ProbeResult(True, "a test double, always available"),
        create=_BareMockVm, real=False,
    ),
    "firecracker-fake": BackendSpec(
        name="firecracker-fake",
        description="FirecrackerVm against a stand-in Firecracker (suite only)",
        capabilities=FIRECRACKER_CAPABILITIES,
        probe=lambda: ProbeResult(True, "a test double, always available"),
        create=_FakeFirecrackerVm, real=False,
    ),
    "libkrun-standin": LIBKRUN_STANDIN_SPEC,
    "vz-fake": VZ_FAKE_SPEC,
}
"""Backends the suite runs besides the registered ones; never registered anywhere."""

BUILDERS: dict[str, Callable[[BackendSpec, pytest.FixtureRequest, Path], BackendUnderTest]] = {
    "mock": _mock,
    "bare-mock": _mock,
    "qemu": _kit_booted,
    "firecracker": _kit_booted,
    "firecracker-fake": _firecracker_fake,
    "libkrun-standin": libkrun_standin,
    "vz-fake": vz_fake,
}
"""Per backend: how to build VMs of it in this suite. ``where`` is a short directory (unix
socket paths are limited to 107 bytes) that lives as long as the test module."""


def backend_under_test(spec: BackendSpec, request: pytest.FixtureRequest,
                       where: Path) -> BackendUnderTest:
    """The table's recipe for ``spec``, or the spec alone for a backend not in the table."""
    builder = BUILDERS.get(spec.name)
    if builder is None:
        return BackendUnderTest(spec)
    return builder(spec, request, where)
