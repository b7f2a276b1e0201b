"""aarch64 guests on this (x86_64) host, for real: QEMU's ``virt`` machine under TCG.

One VM is booted for the module (TCG emulation of another architecture is the slow path);
the tests share it. The image test serves a multi-platform index (amd64 and arm64 busybox
images) from a real registry and checks that a sandbox of each architecture gets its own
variant, and that a platform the index lacks is refused naming the ones it has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from backend_requirements import require_backend
from conftest import real_part_missing
from fixtures.images import tarbuild
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit, build_guestkit, default_cache_dir
from kelpie.guestkit._lock import read_lock
from kelpie.images import ImageNotFound, ImageStore, Platform, pull_image
from kelpie.images import ImageReference as Ref
from kelpie.runtime import Runtime
from kelpie.vm import SnapshotIncompatible, VmConfig, VmSnapshot, VmState
from registry_server import missing_tools, start_registry, write_multiarch_layout
from vm_fixtures import short_state_dir

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def kit64() -> GuestKit:
    require_backend("qemu")
    if shutil.which("qemu-system-aarch64") is None:
        real_part_missing("qemu-system-aarch64 is not installed (scripts/setup installs "
                          "qemu-system-arm)")
    return build_guestkit(arch="aarch64")


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    yield from short_state_dir("a64")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(kit64: GuestKit, where: Path) -> AsyncIterator[QemuVm]:
    machine = QemuVm(VmConfig(arch="aarch64", memory_mib=384), kit=kit64,
                     workdir=where / "shared")
    await machine.start()
    yield machine
    await machine.stop(force=True)


async def test_an_aarch64_guest_runs_commands_and_files(vm: QemuVm) -> None:
    result = await vm.exec(["uname", "-m"])
    assert (result.exit_code, result.stdout) == (0, b"aarch64\n")
    await vm.write_file("/root/note", b"written from an x86_64 host")
    assert await vm.read_file("/root/note") == b"written from an x86_64 host"
    failed = await vm.exec(["sh", "-c", "echo oops >&2; exit 3"])
    assert (failed.exit_code, failed.stderr) == (3, b"oops\n")
    host = vm.host_info()
    assert (host.arch, host.machine, host.cpu_model) == ("aarch64", "virt", "cortex-a72")


async def test_pause_and_resume(vm: QemuVm) -> None:
    await vm.pause()
    assert vm.state is VmState.PAUSED
    await vm.resume()
    assert (await vm.exec(["echo", "back"])).stdout == b"back\n"


async def test_a_full_snapshot_restores_only_into_an_aarch64_guest(
        vm: QemuVm, kit64: GuestKit, where: Path) -> None:
    await vm.write_file("/root/kept", b"in the snapshot")
    snapshot = await vm.snapshot(where / "snap")
    assert vm.state is VmState.RUNNING
    assert (snapshot.manifest.arch, snapshot.manifest.machine) == ("aarch64", "virt")
    x86 = QemuVm(VmConfig(arch="x86_64"), workdir=where / "x86")
    with pytest.raises(SnapshotIncompatible, match="architecture: snapshot is aarch64"):
        await x86.restore(VmSnapshot.open(snapshot.path))
    assert x86.state is VmState.CREATED
    clone = QemuVm(VmConfig(arch="aarch64"), kit=kit64, workdir=where / "clone")
    await clone.restore(VmSnapshot.open(snapshot.path))
    try:
        assert await clone.read_file("/root/kept") == b"in the snapshot"
        assert (await clone.exec(["uname", "-m"])).stdout == b"aarch64\n"
    finally:
        await clone.stop(force=True)


def _busybox_entries(busybox: Path, arch: str) -> list[tarbuild.Entry]:
    return [tarbuild.directory("bin"), tarbuild.file("bin/busybox", busybox.read_bytes(), 0o755),
            *(tarbuild.symlink(f"bin/{a}", "busybox") for a in ("sh", "cat", "uname", "echo")),
            tarbuild.directory("tmp", 0o1777), tarbuild.file("arch", arch)]


def _arm64_busybox(where: Path) -> Path:
    """busybox for arm64, from the .deb the aarch64 kit was built from."""
    package = next(i.package for i in read_lock().packages("arm64")
                   if i.package.name == "busybox-static")
    unpacked = where / "busybox-arm64"
    subprocess.run(["dpkg-deb", "-x", str(default_cache_dir() / "debs" / package.deb_name),
                    str(unpacked)], check=True)
    return unpacked / "bin" / "busybox"


async def test_each_architecture_gets_its_variant_of_a_multi_platform_image(
        kit64: GuestKit, guestkit: GuestKit, where: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = missing_tools()
    if missing:
        real_part_missing(f"the image test needs {', '.join(missing)} (see scripts/setup)")
    host_busybox = shutil.which("busybox")
    assert host_busybox is not None
    write_multiarch_layout(where / "layout", {
        ("linux", "amd64"): _busybox_entries(Path(host_busybox), "amd64"),
        ("linux", "arm64"): _busybox_entries(_arm64_busybox(where), "arm64"),
    }, tag="multi")
    registry = start_registry(where / "registry")
    state = where / "state"
    monkeypatch.setenv("KELPIE_STATE_DIR", str(state))
    try:
        registry.push(where / "layout", "multi", "test/bb", all_platforms=True)
        store = ImageStore(state / "images")
        reference = Ref.parse(f"{registry.address}/test/bb:multi")
        for arch in ("x86_64", "aarch64"):
            await pull_image(store, reference, platform=Platform.for_arch(arch), insecure=True)
        with pytest.raises(ImageNotFound, match="available: linux/amd64, linux/arm64"):
            await pull_image(store, reference, platform=Platform.parse("linux/riscv64"),
                             insecure=True)
        async with Runtime(data_dir=state, images=store,
                           backend_options={"qemu": {"kit": guestkit}}) as rt:
            box = await rt.create(image=str(reference), arch="aarch64", backend="qemu",
                                  name="arm")
            try:
                assert box.config.arch == "aarch64"
                result = await rt.exec("arm", ["sh", "-c", "uname -m; cat /arch"])
                assert result.stdout == b"aarch64\narm64", result.stderr
            finally:
                await rt.remove("arm", force=True)
    finally:
        registry.stop()
        os.environ.pop("KELPIE_STATE_DIR", None)
