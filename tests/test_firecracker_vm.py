"""FirecrackerVm's own behaviour against the stand-in Firecracker (``fake_firecracker.py``):
what it asks of Firecracker's API, what it refuses, how a fault or a missing binary is
reported, re-attaching, and the KVM proof. The shared behaviour suite covers exec, files,
streams, pause, snapshots and checkpoints through the same stand-in (``firecracker-fake``).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from backend_fixtures import SUITE_DOUBLES, BackendUnderTest, _firecracker_fake
from kelpie.backends.firecracker import SPEC, probe
from kelpie.backends.firecracker._host import kvm_boots
from kelpie.backends.firecracker._vm import FirecrackerVm
from kelpie.guestkit import GuestKit
from kelpie.vm import BootError, ConfigError, Mount, NetworkMode, VmState
from vm_fixtures import short_state_dir

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    yield from short_state_dir("fc")


@pytest.fixture(scope="module")
def firecracker(request: pytest.FixtureRequest, where: Path) -> BackendUnderTest:
    return _firecracker_fake(SUITE_DOUBLES["firecracker-fake"], request, where)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(firecracker: BackendUnderTest) -> AsyncIterator[FirecrackerVm]:
    machine = firecracker.new_vm(hostname="fc-test")
    assert isinstance(machine, FirecrackerVm)
    await machine.start()
    yield machine
    await machine.stop(force=True)


def api_requests(vm: FirecrackerVm) -> list[str]:
    """``METHOD /path status`` of each API request the stand-in logged, in order."""
    log = (vm.workdir / "firecracker.log").read_text()
    return re.findall(r'fake firecracker API: "([A-Z]+ \S+) HTTP/1.1" (\d+)', log)  # type: ignore[return-value]


async def test_boot_configures_firecracker_through_its_api(vm: FirecrackerVm) -> None:
    requests = [call for call, _ in api_requests(vm)]
    assert requests[1:6] == ["PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs",
                             "PUT /vsock", "PUT /actions"]  # after GET / (is it up?)
    assert all(status in ("200", "204") for _, status in api_requests(vm))
    assert (await vm.exec(["hostname"])).stdout == b"fc-test\n"
    assert (vm.workdir / "rootfs.ext4").is_file()  # its own copy of the image


async def test_the_guest_gets_its_settings_on_the_kernel_command_line(vm: FirecrackerVm) -> None:
    log = (vm.workdir / "firecracker.log").read_text()
    assert "agent starting on vsock port 1024" in log  # the stand-in read kelpie.vsock=1024


async def test_attach_finds_a_running_and_a_paused_vm(firecracker: BackendUnderTest) -> None:
    machine = firecracker.new_vm()
    assert isinstance(machine, FirecrackerVm)
    await machine.start()
    await machine.detach()
    again = await type(machine).attach(machine.id, workdir=machine.workdir)
    assert again.state is VmState.RUNNING and again.pid is not None
    assert (await again.exec(["echo", "attached"])).stdout == b"attached\n"
    await again.pause()
    await again.detach()
    paused = await type(machine).attach(machine.id, workdir=machine.workdir)
    assert paused.state is VmState.PAUSED
    await paused.resume()
    assert (await paused.exec(["echo", "resumed"])).stdout == b"resumed\n"
    await paused.stop()
    assert paused.state is VmState.STOPPED
    assert not (machine.workdir / "firecracker.pid").exists()


async def test_a_vm_whose_firecracker_is_gone_attaches_crashed(firecracker: BackendUnderTest,
                                                               where: Path) -> None:
    machine = firecracker.new_vm()
    assert isinstance(machine, FirecrackerVm)
    machine.workdir.mkdir(parents=True)
    (machine.workdir / "firecracker.pid").write_text(f"{os.getpid()}\n")  # not Firecracker
    machine._write_record(machine.config)
    found = await type(machine).attach(machine.id, workdir=machine.workdir)
    assert found.state is VmState.CRASHED
    assert found.crash_reason is not None and "not this VM's Firecracker" in found.crash_reason


async def test_network_and_shared_directories_are_refused(firecracker: BackendUnderTest,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tap device"):
        await firecracker.new_vm(network=NetworkMode.NAT).start()
    with pytest.raises(ConfigError, match="no shared directories"):
        await firecracker.new_vm(mounts=(Mount(tmp_path, "/data"),)).start()


async def test_an_api_fault_is_reported_with_firecrackers_own_message(
        firecracker: BackendUnderTest, where: Path) -> None:
    kit = GuestKit(kernel=where / "gone-vmlinux", initrd=where / "initrd.img",
                   digest="stand-in", versions={}, sizes={})
    machine = firecracker.spec.create(firecracker.new_vm().config, kit=kit,
                                      firecracker=str(where / "firecracker"))
    firecracker.place(machine)
    with pytest.raises(BootError) as info:
        await machine.start()
    assert "Firecracker refused PUT /boot-source (400)" in str(info.value)
    assert "Unable to open the kernel file" in str(info.value)
    assert machine.state is VmState.STOPPED
    assert machine.pid is None  # the Firecracker it started is gone


async def test_a_missing_binary_says_where_it_was_looked_for(
        firecracker: BackendUnderTest, where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine = firecracker.spec.create(firecracker.new_vm().config,
                                      firecracker=str(where / "absent"))
    with pytest.raises(BootError, match="KELPIE_FIRECRACKER_BIN"):
        await machine.start()
    monkeypatch.setenv("KELPIE_FIRECRACKER_BIN", str(where / "absent"))
    result = probe()
    assert not result.available and "firecracker not found" in result.reason
    assert SPEC.name == "firecracker" and SPEC.attach is not None


async def test_the_kvm_proof_boots_once_and_is_cached(where: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KELPIE_STATE_DIR", str(where / "state"))
    kit = GuestKit(kernel=where / "vmlinux", initrd=where / "initrd.img", digest="proof",
                   versions={}, sizes={})
    runs = where / "proof-runs"
    booting = where / "booting-firecracker"
    booting.write_text(f"#!/bin/sh\necho run >> {runs}\necho 'kelpie-init [0.1]: up'\n"
                       "exec sleep 30\n")
    booting.chmod(0o755)
    for _ in range(2):
        boots, why = kvm_boots(str(booting), kit)
        assert boots and "booted the guest" in why
    assert runs.read_text() == "run\n"  # the second verdict came from the cache
    failing = where / "failing-firecracker"
    failing.write_text("#!/bin/sh\necho 'Error: KVM_CREATE_VM failed'; exit 1\n")
    failing.chmod(0o755)
    boots, why = kvm_boots(str(failing), kit)
    assert not boots and "KVM_CREATE_VM failed" in why
