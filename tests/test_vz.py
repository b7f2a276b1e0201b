"""The Virtualization.framework backend: its bridge against a fake of the framework (any
host), VzVm driven end to end through that fake and the real guest agent, and, on macOS
only, the real framework.

The fake (``fake_virtualization.py``) checks the framework's threading rule (every VM call
on the VM's queue) and records violations; each test using it ends by asserting none.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from fake_virtualization import FakeHost
from kelpie.backends.vz import CAPABILITIES, SPEC, create
from kelpie.backends.vz._bridge import (
    ConfigurationRefused,
    build_configuration,
    load_framework,
    machine_identity,
    unavailable_reason,
)
from kelpie.backends.vz._launch import AGENT_VSOCK_PORT, VzLaunch
from kelpie.backends.vz._vm import VzVm
from kelpie.guestkit import GuestKit
from kelpie.vm import (
    ConfigError,
    ExecOutput,
    InvalidStateError,
    Mount,
    NetworkMode,
    PortMapping,
    SnapshotError,
    SnapshotKind,
    UnsupportedOperation,
    VmConfig,
    VmSnapshot,
    VmState,
)
from vz_fake_backend import FakeVzVm, fake_kit, raw_disk
from waiting import wait_until

MIB = 1024 * 1024
macos_only = pytest.mark.skipif(sys.platform != "darwin",
                                reason="Virtualization.framework exists only on macOS")


@pytest.fixture
def where() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes), removed afterwards."""
    path = Path(f"/tmp/kelpie-vz-{os.getpid()}-{os.urandom(3).hex()}")
    path.mkdir()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def kit(where: Path) -> GuestKit:
    return fake_kit(where / "kit")


def fake_host(where: Path, **options: object) -> Iterator[FakeHost]:
    host = FakeHost(where / "mac", **options)  # type: ignore[arg-type]
    yield host
    host.shutdown()
    assert host.violations == []


@pytest.fixture
def host(where: Path) -> Iterator[FakeHost]:
    yield from fake_host(where)


@pytest.fixture
def host13(where: Path) -> Iterator[FakeHost]:
    yield from fake_host(where, macos=(13, 6))


def new_vm(host: FakeHost, kit: GuestKit, where: Path, name: str, **config: object) -> VzVm:
    fields: dict[str, object] = {"root_disk": raw_disk(where), **config}
    return FakeVzVm(VmConfig(**fields), framework=host.framework(), kit=kit,  # type: ignore[arg-type]
                    workdir=where / name)


@pytest_asyncio.fixture
async def vm(host: FakeHost, kit: GuestKit, where: Path) -> AsyncIterator[VzVm]:
    machine = new_vm(host, kit, where, "one", env={"FROM_CONFIG": "yes"})
    await machine.start()
    yield machine
    await machine.stop(force=True)


# ---- the bridge ---------------------------------------------------------------------------


def launch_of(where: Path, kit: GuestKit, config: VmConfig, **fields: object) -> VzLaunch:
    values: dict[str, object] = {
        "config": config, "kernel": kit.kernel, "initrd": kit.initrd, "hostname": "guest-1",
        "console_log": where / "console.log", **fields}
    return VzLaunch(**values)  # type: ignore[arg-type]


def test_the_bridge_builds_the_machine_the_config_describes(host: FakeHost, kit: GuestKit,
                                                            where: Path) -> None:
    data, cache = where / "data", where / "cache"
    data.mkdir()
    cache.mkdir()
    disk = raw_disk(where)
    config = VmConfig(vcpus=3, memory_mib=1536, network=NetworkMode.NAT, kernel_args=("quiet2",),
                      mounts=(Mount(data, "/data", read_only=True),
                              Mount(cache, "/cache", tag="cache")))
    built = build_configuration(host.framework(), launch_of(where, kit, config, disk=disk))

    loader = built.bootLoader()
    assert loader.kernelURL().path() == str(kit.kernel)
    assert loader.initialRamdiskURL().path() == str(kit.initrd)
    words = loader.commandLine().split()
    for word in ("kelpie.hostname=guest-1", "kelpie.root=/dev/vda",
                 f"kelpie.vsock={AGENT_VSOCK_PORT}", "kelpie.sharefs=virtiofs", "quiet2",
                 "kelpie.mounts=share0:/data:ro,cache:/cache:rw"):
        assert word in words
    assert words.index("console=hvc0") > words.index("console=ttyS0")  # the last one wins
    assert not [w for w in words if w.startswith(("tsc", "kelpie.net"))]
    assert (built.CPUCount(), built.memorySize()) == (3, 1536 * MIB)

    [block] = built.storageDevices()
    assert block.attachment().URL().path() == str(disk)
    assert block.attachment().readOnly() is False  # the VM's own copy, written in place
    shares = [(d.tag(), d.share().directory().URL().path(), d.share().directory().readOnly())
              for d in built.directorySharingDevices()]
    assert shares == [("share0", str(data), True), ("cache", str(cache), False)]
    assert len(built.socketDevices()) == 1
    [console] = built.serialPorts()
    assert console.attachment().URL().path() == str(where / "console.log")
    assert console.attachment().append() is False
    [nic] = built.networkDevices()
    assert type(nic.attachment()).__name__ == "VZNATNetworkDeviceAttachment"
    assert len(built.entropyDevices()) == 1
    assert len(built.platform().machineIdentifier().dataRepresentation()) == 16


def test_without_disk_network_or_shares_the_machine_has_none(host: FakeHost, kit: GuestKit,
                                                             where: Path) -> None:
    built = build_configuration(host.framework(), launch_of(where, kit, VmConfig()))
    assert built.storageDevices() == [] and built.directorySharingDevices() == []
    assert built.networkDevices() == []
    words = built.bootLoader().commandLine().split()
    assert not [w for w in words if w.startswith(("kelpie.root", "kelpie.mounts",
                                                  "kelpie.sharefs"))]


def test_a_saved_identity_is_built_again(host: FakeHost, kit: GuestKit, where: Path) -> None:
    fw = host.framework()
    config = VmConfig(network=NetworkMode.NAT)
    first = build_configuration(fw, launch_of(where, kit, config))
    machine_id, mac = machine_identity(first)
    again = build_configuration(fw, launch_of(where, kit, config, machine_id=machine_id,
                                              mac_address=mac, command_line="saved words"))
    assert machine_identity(again) == (machine_id, mac)
    assert again.bootLoader().commandLine() == "saved words"


def test_the_frameworks_refusal_is_quoted(host: FakeHost, kit: GuestKit, where: Path) -> None:
    with pytest.raises(ConfigurationRefused, match="CPU count 16 is out of range"):
        build_configuration(host.framework(), launch_of(where, kit, VmConfig(vcpus=16)))
    with pytest.raises(ConfigurationRefused, match=r"root disk .*No such file"):
        build_configuration(host.framework(),
                            launch_of(where, kit, VmConfig(), disk=where / "missing.img"))


async def test_a_refused_configuration_is_a_config_error(host: FakeHost, kit: GuestKit,
                                                         where: Path) -> None:
    machine = new_vm(host, kit, where, "big", vcpus=16)
    with pytest.raises(ConfigError, match="CPU count 16"):
        await machine.start()
    assert machine.state is VmState.STOPPED


def test_what_the_backend_cannot_do_is_refused_at_creation(host: FakeHost, kit: GuestKit,
                                                          where: Path) -> None:
    with pytest.raises(ConfigError, match="forwards no host port"):
        new_vm(host, kit, where, "ports", network=NetworkMode.NAT,
               ports=(PortMapping(8080, 80),))
    with pytest.raises(ConfigError, match="cannot enforce egress"):
        new_vm(host, kit, where, "policy", network=NetworkMode.POLICY)


async def test_a_qcow2_root_disk_is_refused(host: FakeHost, kit: GuestKit, where: Path) -> None:
    qcow2 = where / "base.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 508)
    machine = new_vm(host, kit, where, "qcow2", root_disk=qcow2)
    with pytest.raises(ConfigError, match="raw images only"):
        await machine.start()


# ---- VzVm through the fake ----------------------------------------------------------------


async def test_exec_files_and_a_graceful_stop(vm: VzVm, host: FakeHost) -> None:
    assert vm.backend_name == "vz-fake" and vm.transitions[-1][1] is VmState.RUNNING
    result = await vm.exec(["sh", "-c", "echo $FROM_CONFIG; hostname; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (
        3, f"yes\nkelpie-{vm.id[:8]}\n".encode(), b"err\n")
    await vm.write_file("/tmp/note", b"written\n", mode=0o600)
    assert await vm.read_file("/tmp/note") == b"written\n"
    [entry] = [e for e in await vm.list_dir("/tmp") if e.name == "note"]
    assert (entry.type, entry.size, entry.mode) == ("file", 8, 0o600)
    assert (vm.workdir / "disk.img").read_bytes() == raw_disk(vm.workdir.parent).read_bytes()
    machine = host.machine_of(vm.workdir)
    await vm.stop(grace=10)  # the agent powers the guest off: no need to wait the grace out
    assert vm.state is VmState.STOPPED and vm.crash_reason is None
    assert machine.vm_state == 0 and machine.guest is not None
    assert machine.guest.process is not None and machine.guest.process.poll() is not None
    assert host.open_connections == 0  # the bridge closed each connection after its dup


async def test_the_disk_copy_outlives_a_stop(vm: VzVm) -> None:
    disk = vm.workdir / "disk.img"
    disk.write_bytes(b"changed by the guest")
    await vm.stop(force=True)
    await vm.start()
    assert disk.read_bytes() == b"changed by the guest"


async def test_pause_freezes_the_guest_and_resume_continues(vm: VzVm, host: FakeHost) -> None:
    async with vm.exec_stream(["sh", "-c", "sleep 0.3; echo woke"]) as process:
        first = asyncio.ensure_future(anext(aiter(process)))
        await vm.pause()
        assert vm.state is VmState.PAUSED and host.machine_of(vm.workdir).vm_state == 2
        with pytest.raises(InvalidStateError):
            await vm.exec(["true"])
        done, _ = await asyncio.wait([first], timeout=1.0)  # a running guest prints in 0.3 s
        assert not done, "the paused guest's command went on running"
        await vm.resume()
        event = await asyncio.wait_for(first, 10)
        assert isinstance(event, ExecOutput) and event.data == b"woke\n"
        assert (await process.wait()).exit_code == 0


async def test_full_snapshot_and_restore_on_macos_14(vm: VzVm, host: FakeHost, kit: GuestKit,
                                                    where: Path) -> None:
    await vm.write_file("/root/before", b"kept\n")
    snapshot = await vm.snapshot(where / "full")
    assert vm.state is VmState.RUNNING
    manifest = snapshot.manifest
    assert set(manifest.blobs) == {"state.vzvmsave", "disk.img"}
    assert (manifest.kind, manifest.backend, manifest.backend_version) == (
        SnapshotKind.FULL, "vz-fake", "14.5")
    assert manifest.guestkit_digest == kit.digest
    record = manifest.extra["vz"]
    assert record["agent_port"] == AGENT_VSOCK_PORT and len(record["machine_id"]) == 32
    await vm.write_file("/root/after", b"lost\n")

    target = new_vm(host, kit, where, "two")
    await target.restore(VmSnapshot.open(snapshot.path), paused=True)
    assert target.state is VmState.PAUSED
    await target.resume()
    assert await target.read_file("/root/before") == b"kept\n"
    assert not [e for e in await target.list_dir("/root") if e.name == "after"]
    renamed = await target.exec(["hostname"])  # resynced to its own name
    assert renamed.stdout == f"kelpie-{target.id[:8]}\n".encode()
    restored = host.machine_of(target.workdir).configuration
    assert machine_identity(restored) == machine_identity(host.machine_of(vm.workdir)
                                                          .configuration)
    await target.stop(force=True)


async def test_a_restore_the_framework_refuses_leaves_the_vm_stopped(
    vm: VzVm, host: FakeHost, kit: GuestKit, where: Path
) -> None:
    snapshot = await vm.snapshot(where / "full")
    saved_disk = b"the disk of the restoring VM"
    target = new_vm(host, kit, where, "two")
    target.workdir.mkdir()
    (target.workdir / "disk.img").write_bytes(saved_disk)
    state = snapshot.blob_path("state.vzvmsave")
    os.chmod(state, 0o600)
    state.write_bytes(b"garbage")  # unreadable for the framework (blobs are verified first)
    opened = VmSnapshot.open(snapshot.path)
    object.__setattr__(opened, "verify", lambda: None)  # get past Kelpie's own check
    with pytest.raises(SnapshotError, match=r"could not restore .* cannot be read"):
        await target.restore(opened)
    assert target.state is VmState.STOPPED
    assert (target.workdir / "disk.img").read_bytes() == saved_disk  # put back


async def test_full_snapshots_are_unsupported_before_macos_14(host13: FakeHost, kit: GuestKit,
                                                              where: Path) -> None:
    machine = new_vm(host13, kit, where, "old")
    await machine.start()
    with pytest.raises(UnsupportedOperation, match=r"needs macOS 14 .* this is macOS 13.6"):
        await machine.snapshot(where / "full")
    assert machine.state is VmState.RUNNING  # refused before the guest was paused
    assert host13.machine_of(machine.workdir).vm_state == 1
    assert not (where / "full").exists()

    await machine.mkdir("/workspace/job")  # checkpoints need no saved state
    await machine.write_file("/workspace/job/out.txt", b"result\n")
    checkpoint = await machine.snapshot(where / "cp", kind=SnapshotKind.CHECKPOINT)
    target = new_vm(host13, kit, where, "new")
    await target.restore(VmSnapshot.open(checkpoint.path))
    assert await target.read_file("/workspace/job/out.txt") == b"result\n"
    await target.stop(force=True)
    await machine.stop(force=True)


async def test_the_framework_stopping_the_vm_marks_it_crashed(vm: VzVm, host: FakeHost) -> None:
    async with vm.exec_stream(["sh", "-c", "echo ready; sleep 100"]) as process:
        assert isinstance(await anext(aiter(process)), ExecOutput)
        host.crash(host.machine_of(vm.workdir), "Internal Virtualization error.")
        await wait_until(lambda: vm.state is VmState.CRASHED, 10, "the VM marked crashed")
        with pytest.raises(Exception, match=r"not running|lost|stopped"):
            await process.wait()
    assert vm.crash_reason is not None
    assert "Internal Virtualization error. (VZErrorDomain 1)" in vm.crash_reason
    with pytest.raises(InvalidStateError):
        await vm.exec(["true"])
    await vm.stop()
    assert vm.state is VmState.STOPPED


async def test_a_guest_that_powers_itself_off_is_marked_crashed(vm: VzVm, host: FakeHost) -> None:
    guest = host.machine_of(vm.workdir).guest
    assert guest is not None and guest.process is not None
    guest.process.kill()  # the guest's power-off, as the framework reports it
    await wait_until(lambda: vm.state is VmState.CRASHED, 10, "the VM marked crashed")
    assert vm.crash_reason is not None and "the guest powered itself off" in vm.crash_reason


async def test_a_guest_whose_agent_never_answers_fails_the_boot(host: FakeHost, kit: GuestKit,
                                                                where: Path) -> None:
    machine = FakeVzVm(VmConfig(kernel_args=("kelpie.vsock=7",)),  # the guest listens on 7
                       framework=host.framework(), kit=kit, workdir=where / "deaf",
                       boot_timeout=1.0)
    with pytest.raises(Exception, match=f"vsock port {AGENT_VSOCK_PORT}") as info:
        await machine.start()
    assert "fake guest: booting" in str(info.value)  # the console's tail
    assert machine.state is VmState.STOPPED


def test_the_spec() -> None:
    assert (SPEC.name, SPEC.priority, SPEC.attach, SPEC.real) == ("vz", 20, None, True)
    assert SPEC.capabilities is CAPABILITIES and not CAPABILITIES.egress_policy
    assert CAPABILITIES.snapshot_kinds == {SnapshotKind.FULL, SnapshotKind.CHECKPOINT}
    assert isinstance(create(VmConfig()), VzVm)


@pytest.mark.skipif(sys.platform == "darwin", reason="the probe's answer off macOS")
def test_the_probe_says_why_not_off_macos() -> None:
    result = SPEC.probe()
    assert not result.available
    assert result.reason == "Virtualization.framework exists only on macOS"


def test_an_unsupported_mac_is_said_so(where: Path) -> None:
    for host, reason in ((FakeHost(where / "a", supported=False), "isSupported() is false"),
                         (FakeHost(where / "b", macos=(11, 7)), "needs macOS 12 or later")):
        found = unavailable_reason(host.framework())
        assert found is not None and reason in found


# ---- the real framework (macOS only) ------------------------------------------------------


@macos_only
def test_the_real_probe_agrees_with_the_framework() -> None:
    result = SPEC.probe()
    try:
        fw = load_framework()
    except Exception as exc:
        assert not result.available and str(exc) in result.reason
        return
    assert result.available == (unavailable_reason(fw) is None), result.reason


@macos_only
def test_the_real_framework_accepts_the_bridges_configuration(tmp_path: Path) -> None:
    if not SPEC.probe().available:
        pytest.skip(f"vz is not available here: {SPEC.probe().reason}")
    kit = fake_kit(tmp_path / "kit")  # validation does not read the kernel
    data = tmp_path / "data"
    data.mkdir()
    config = VmConfig(network=NetworkMode.NAT, mounts=(Mount(data, "/data", read_only=True),))
    fw = load_framework()
    built = build_configuration(fw, launch_of(tmp_path, kit, config, disk=raw_disk(tmp_path)))
    machine_id, _ = machine_identity(built)
    assert len(machine_id) > 0
    with pytest.raises(ConfigurationRefused):
        build_configuration(fw, launch_of(tmp_path, kit, VmConfig(vcpus=32, memory_mib=16384)))


@macos_only
async def test_a_real_vm_boots_and_runs_a_command(tmp_path: Path) -> None:
    kit_dir = os.environ.get("KELPIE_VZ_KIT")
    if not kit_dir or not SPEC.probe().available:
        pytest.skip("set KELPIE_VZ_KIT to a guest kit directory built for this Mac "
                    "(vmlinux, initrd.cpio; an init with kelpie.vsock and virtio-pci drivers)")
    kit = GuestKit(Path(kit_dir) / "vmlinux", Path(kit_dir) / "initrd.cpio", "sha256:local",
                   versions={}, sizes={})
    machine = VzVm(VmConfig(), kit=kit, workdir=tmp_path / "vm")
    await machine.start()
    try:
        assert (await machine.exec(["echo", "hello"])).stdout == b"hello\n"
    finally:
        await machine.stop()
