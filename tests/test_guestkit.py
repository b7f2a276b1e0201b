"""The guest kit: its builder pieces (unit tests on synthetic inputs), a real build from
Debian packages (needs apt), and a real boot under QEMU (marked ``vm``)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import lzma
import marshal
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import pytest

from kelpie import protocol
from kelpie.guestkit import (
    GuestKit,
    GuestKitError,
    GuestNetwork,
    GuestShare,
    _bootcheck,
    _build,
    _cpio,
    _elf,
    _kernel,
    _modules,
    _python,
    build_guestkit,
    kernel_cmdline,
    load_guestkit,
)
from kelpie.guestkit._cmdline import tsc_khz_from_cpuinfo

INIT_SH = Path(__file__).parents[1] / "src/kelpie/guestkit/init.sh"


# --- synthetic ELF files ------------------------------------------------------------------


class Section(NamedTuple):
    name: str
    type: int
    data: bytes
    link: int = 0


def make_elf(sections: list[Section], notes: bytes | None = None) -> bytes:
    """A minimal little-endian ELF64 file with these sections (and a PT_NOTE segment)."""
    names = b"\0"
    name_offsets = []
    for section in [*sections, Section(".shstrtab", 3, b"")]:
        name_offsets.append(len(names))
        names += section.name.encode() + b"\0"
    all_sections = [*sections, Section(".shstrtab", 3, names)]
    body = b""
    offsets = []
    start = 64 + (56 if notes is not None else 0)
    for section in all_sections:
        offsets.append(start + len(body))
        body += section.data
    notes_offset = start + len(body)
    body += notes or b""
    shoff = start + len(body)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        1, 62, 1, 0,
        64 if notes is not None else 0,
        shoff, 0, 64, 56,
        1 if notes is not None else 0,
        64, len(all_sections) + 1, len(all_sections),
    )  # fmt: skip
    phdrs = b""
    if notes is not None:
        phdrs = struct.pack("<IIQQQQQQ", 4, 4, notes_offset, 0, 0, len(notes), len(notes), 4)
    table = bytes(64)  # section 0 is the null section
    for name_offset, offset, section in zip(name_offsets, offsets, all_sections, strict=True):
        table += struct.pack(
            "<IIQQQQIIQQ", name_offset, section.type, 0, 0, offset, len(section.data),
            section.link, 0, 1, 0,
        )  # fmt: skip
    return header + phdrs + body + table


def fake_module(modinfo: dict[str, str | list[str]]) -> bytes:
    records = []
    for key, value in modinfo.items():
        for item in [value] if isinstance(value, str) else value:
            records.append(f"{key}={item}".encode())
    return make_elf([Section(".modinfo", 1, b"\0".join(records) + b"\0")])


def write_module(moddir: Path, relpath: str, **modinfo: str | list[str]) -> None:
    path = moddir / "kernel" / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fake_module(modinfo))


# --- ELF and kernel modules ---------------------------------------------------------------


def test_needed_libraries_reads_dt_needed(tmp_path: Path) -> None:
    dynstr = b"\0libc.so.6\0libz.so.1\0"
    dynamic = struct.pack("<qQqQqQ", 1, 1, 1, 11, 0, 0)
    elf = make_elf([Section(".dynstr", 3, dynstr), Section(".dynamic", 6, dynamic, link=1)])
    (tmp_path / "prog").write_bytes(elf)
    assert _elf.needed_libraries(tmp_path / "prog") == ["libc.so.6", "libz.so.1"]


def test_elf_reader_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "script").write_bytes(b"#!/bin/sh\n" + bytes(100))
    with pytest.raises(_elf.ElfError):
        _elf.needed_libraries(tmp_path / "script")


@pytest.fixture
def module_tree(tmp_path: Path) -> _modules.ModuleTree:
    moddir = tmp_path / "lib/modules/6.1.0-test"
    write_module(moddir, "drivers/virtio/virtio.ko", name="virtio", depends="")
    write_module(moddir, "drivers/virtio/virtio_ring.ko", name="virtio_ring", depends="")
    write_module(moddir, "drivers/virtio/virtio_mmio.ko", depends="virtio,virtio_ring")
    write_module(moddir, "drivers/char/hw_random/virtio-rng.ko", depends="virtio,virtio_ring")
    write_module(moddir, "fs/jbd2/jbd2.ko", depends="")
    write_module(moddir, "lib/crc16.ko", depends="")
    write_module(moddir, "fs/ext4/ext4.ko", depends="jbd2,crc16", softdep="pre: crypto-crc32c")
    write_module(moddir, "crypto/crc32c_generic.ko", alias=["crypto-crc32c", "crc32c"])
    write_module(moddir, "arch/x86/crypto/crc32c-intel.ko", alias=["crypto-crc32c"])
    write_module(moddir, "fs/loop_a.ko", depends="loop_b")
    write_module(moddir, "fs/loop_b.ko", depends="loop_a")
    (moddir / "modules.builtin.modinfo").write_bytes(b"crc_builtin.alias=crc-b\0")
    return _modules.ModuleTree(moddir)


def test_load_order_puts_dependencies_first(module_tree: _modules.ModuleTree) -> None:
    order = [m.name for m in module_tree.load_order(["virtio_mmio", "virtio-rng"])]
    assert order == ["virtio", "virtio_ring", "virtio_mmio", "virtio_rng"]


def test_softdep_resolves_through_aliases_to_the_generic_module(
    module_tree: _modules.ModuleTree,
) -> None:
    order = [m.name for m in module_tree.load_order(["ext4"])]
    assert order == ["jbd2", "crc16", "crc32c_generic", "ext4"]
    ext4 = module_tree.module("ext4")
    assert ext4.path == PurePosixPath("kernel/fs/ext4/ext4.ko")


def test_groups_do_not_repeat_core_modules(module_tree: _modules.ModuleTree) -> None:
    plan = _modules.plan_groups(
        module_tree, {"core": ("virtio_mmio",), "rng": ("virtio_rng",), "blk": ("ext4",)}
    )
    assert [m.name for m in plan["rng"]] == ["virtio_rng"]
    assert "virtio" not in [m.name for m in plan["blk"]]


def test_missing_modules_and_cycles_are_errors(module_tree: _modules.ModuleTree) -> None:
    with pytest.raises(_modules.ModuleError, match="no_such_module"):
        module_tree.load_order(["no_such_module"])
    with pytest.raises(_modules.ModuleError, match="cycle"):
        module_tree.load_order(["loop_a"])
    assert module_tree.load_order(["crc_builtin"]) == []


# --- cpio ---------------------------------------------------------------------------------


class CpioMember(NamedTuple):
    mode: int
    data: bytes
    rdev: tuple[int, int]
    mtime: int


def read_newc(data: bytes) -> dict[str, CpioMember]:
    """Parse a newc archive (what the kernel does at boot), in archive order."""
    members: dict[str, CpioMember] = {}
    position = 0
    while True:
        header = data[position : position + 110]
        assert header[:6] == b"070701", f"bad magic at {position}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, size, namesize = fields[1], fields[5], fields[6], fields[11]
        name_end = position + 110 + namesize
        name = data[position + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = CpioMember(mode, data[start : start + size], (fields[9], fields[10]), mtime)
        position = start + size + (-(start + size) % 4)


def test_cpio_is_sorted_deterministic_and_complete(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_bytes(b"\x7fELF-ish")
    (tmp_path / "bin/busybox").chmod(0o755)
    (tmp_path / "bin/sh").symlink_to("busybox")
    (tmp_path / "a.txt").write_text("odd length")
    entries = [*_cpio.tree_entries(tmp_path), _cpio.char_device("dev/console", 5, 1)]
    entries.append(_cpio.directory("dev"))
    first, second = io.BytesIO(), io.BytesIO()
    _cpio.write_archive(first, entries)
    os.utime(tmp_path / "a.txt", (0, 12345))
    _cpio.write_archive(second, reversed(list(_cpio.tree_entries(tmp_path)) + entries[-2:]))
    assert first.getvalue() == second.getvalue()
    members = read_newc(first.getvalue())
    assert list(members) == ["a.txt", "bin", "bin/busybox", "bin/sh", "dev", "dev/console"]
    assert members["bin/sh"].data == b"busybox" and stat.S_ISLNK(members["bin/sh"].mode)
    assert stat.S_IMODE(members["bin/busybox"].mode) == 0o755
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)
    assert {m.mtime for m in members.values()} == {0}


@pytest.mark.parametrize("bad", ["/etc/passwd", "../escape", "a/../../b"])
def test_cpio_refuses_paths_outside_the_archive(bad: str) -> None:
    with pytest.raises(ValueError, match="relative"):
        _cpio.write_archive(io.BytesIO(), [_cpio.regular(bad, b"x")])


def test_cpio_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="twice"):
        _cpio.write_archive(io.BytesIO(), [_cpio.directory("a"), _cpio.directory("a")])


# --- kernel image -------------------------------------------------------------------------


def pvh_note() -> bytes:
    return struct.pack("<III", 4, 8, 18) + b"Xen\0" + struct.pack("<Q", 0x1000000)


def make_bzimage(payload: bytes, setup_sectors: int = 3) -> bytes:
    image = bytearray((setup_sectors + 1) * 512 + 0x100)
    image[0x1F1] = setup_sectors
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<II", image, 0x248, 0x100, len(payload))
    return bytes(image) + payload + bytes(64)


def test_extract_vmlinux_unpacks_an_xz_bzimage() -> None:
    elf = make_elf([Section(".text", 1, b"\x90" * 32)], notes=pvh_note())
    assert _kernel.has_pvh_entry(elf)
    image = make_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ))
    assert _kernel.extract_vmlinux(image) == elf


def test_extract_vmlinux_requires_a_pvh_entry() -> None:
    elf = make_elf([Section(".text", 1, b"\x90" * 32)], notes=b"")
    with pytest.raises(_kernel.KernelImageError, match="PVH"):
        _kernel.extract_vmlinux(make_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ)))
    with pytest.raises(_kernel.KernelImageError, match="bzImage"):
        _kernel.extract_vmlinux(elf)


# --- agent imports, kernel command line ---------------------------------------------------


def test_agent_imports_skip_type_checking_and_own_modules(tmp_path: Path) -> None:
    source = tmp_path / "agent.py"
    source.write_text(
        "import os, json\n"
        "from collections import deque\n"
        "from . import sibling\n"
        "from kelpie import protocol\n"
        "import protocol\n"
        "TYPE_CHECKING = False\n"
        "if TYPE_CHECKING:\n"
        "    import typing\n"
        "else:\n"
        "    import select\n"
        "def f():\n"
        "    import termios\n"
    )
    certain, maybe = _python.agent_imports([source])
    assert certain == ["collections", "json", "os", "select", "termios"]
    assert maybe == ["collections.deque"]


def test_agent_files_are_the_protocol_and_the_whole_guest_package(tmp_path: Path) -> None:
    source = Path(__file__).parents[1] / "src/kelpie"
    modules = sorted(p.name for p in (source / "guest").glob("*.py"))
    files = dict(_build._agent_files(None))
    assert sorted(files) == sorted(["protocol.py", *(f"guest/{name}" for name in modules)])
    assert "guest/agent.py" in files and "guest/__init__.py" in files
    assert files["protocol.py"] == (source / "protocol.py").read_bytes()
    changed = tmp_path / "_link.py"
    changed.write_bytes(b"# changed\n")
    assert dict(_build._agent_files({"guest/_link.py": changed}))["guest/_link.py"] == (
        b"# changed\n"
    )
    with pytest.raises(GuestKitError, match=r"agent\.py.*not files of the guest agent"):
        _build._agent_files({"agent.py": changed})  # the layout before the package


def test_guest_package_imports_only_the_standard_library() -> None:
    """What the kit's trimmed Python is chosen from: every run-time import of the agent."""
    package = Path(__file__).parents[1] / "src/kelpie/guest"
    certain, maybe = _python.agent_imports(sorted(package.glob("*.py")))
    assert {"os", "select", "_signal", "socket", "termios"} <= set(certain)
    for name in certain:
        assert name.split(".")[0] in sys.stdlib_module_names, name
    assert all(name.split(".")[0] in sys.stdlib_module_names for name in maybe)


def test_kernel_cmdline_carries_init_settings() -> None:
    line = kernel_cmdline(
        hostname="box-1",
        root_device="/dev/vda",
        shares=[GuestShare("share0", "/work"), GuestShare("ro.data", "/data", read_only=True)],
        network=GuestNetwork("10.0.2.15/24", "10.0.2.2", "10.0.2.3"),
        tsc_khz=2600000,
    )
    assert line.split() == [
        "console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests",
        "tsc_early_khz=2600000", "tsc=reliable",
        "kelpie.hostname=box-1", "kelpie.root=/dev/vda",
        "kelpie.mounts=share0:/work:rw,ro.data:/data:ro",
        "kelpie.net=10.0.2.15/24,10.0.2.2,10.0.2.3",
    ]  # fmt: skip
    assert "tsc" not in kernel_cmdline(tsc_khz=0)
    assert kernel_cmdline(tsc_khz=0, network=GuestNetwork("10.0.0.2/8")).endswith(
        "kelpie.net=10.0.0.2/8"
    )
    assert kernel_cmdline(tsc_khz=0, agent_vsock_port=1024).endswith("kelpie.vsock=1024")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hostname": "no spaces"},
        {"root_device": "vda"},
        {"shares": [GuestShare("t", "/a,b")]},
        {"shares": [GuestShare("t", "/a b")]},
        {"shares": [GuestShare("t", "/")]},
        {"shares": [GuestShare("bad:tag", "/a")]},
        {"shares": [GuestShare("t", "/a/../etc")]},
        {"network": GuestNetwork("10.0.2.15")},
        {"network": GuestNetwork("10.0.2.15/24", gateway="not-an-ip")},
        {"extra": ["two words"]},
        {"agent_vsock_port": 0},
        {"agent_vsock_port": 2**32},
    ],
)
def test_kernel_cmdline_rejects_what_cannot_travel(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        kernel_cmdline(tsc_khz=0, **kwargs)


def test_tsc_frequency_from_cpuinfo() -> None:
    vm = "processor\t: 0\nflags\t\t: fpu tsc constant_tsc tsc_known_freq\ncpu MHz\t\t: 2600.000\n"
    assert tsc_khz_from_cpuinfo(vm + "\n" + vm) == 2600000
    scaling = "flags\t\t: tsc constant_tsc aperfmperf\ncpu MHz\t\t: 1200.331\n"
    assert tsc_khz_from_cpuinfo(scaling) is None
    assert tsc_khz_from_cpuinfo("flags\t: fpu\ncpu MHz\t: 1000\n") is None


def test_init_script_parses() -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed on this host")
    subprocess.run([busybox, "sh", "-n", str(INIT_SH)], check=True)


# --- a real build -------------------------------------------------------------------------


class Built(NamedTuple):
    kit: GuestKit
    cache: Path
    messages: list[str]
    hashes: dict[str, str]


def file_hashes(kit: GuestKit) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (kit.kernel, kit.initrd)}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """A kit built from empty caches as on a host without apt: ``apt-get`` and
    ``apt-cache`` on PATH only record that they were called, and apt is configured for
    Debian 13 (trixie), which the kit must not follow."""
    cache = tmp_path_factory.mktemp("guestkit-cache")
    shadow = tmp_path_factory.mktemp("no-apt")
    called = shadow / "called"
    for tool in ("apt-get", "apt-cache"):
        (shadow / tool).write_text(f"#!/bin/sh\necho {tool} >> {called}\nexit 100\n")
        (shadow / tool).chmod(0o755)
    (shadow / "apt.conf").write_text('Dir::Etc::sourcelist "trixie.list";\n')
    (shadow / "trixie.list").write_text("deb http://deb.debian.org/debian trixie main\n")
    saved = {k: os.environ.get(k) for k in ("PATH", "APT_CONFIG")}
    os.environ["PATH"] = f"{shadow}:{saved['PATH']}"
    os.environ["APT_CONFIG"] = str(shadow / "apt.conf")
    try:
        messages: list[str] = []
        kit = build_guestkit(cache, progress=messages.append)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert not called.exists(), f"the build ran {called.read_text()}"
    yield Built(kit, cache, messages, file_hashes(kit))


def test_the_kit_is_reproducible_across_directories_and_times(built: Built,
                                                               guestkit: GuestKit) -> None:
    """The session's kit (the default cache, built earlier or by another process) and this
    one (an empty cache, no apt) are the same kit, byte for byte."""
    assert built.kit.digest == guestkit.digest
    assert built.hashes == file_hashes(guestkit)


@pytest.fixture(scope="module")
def initramfs(built: Built) -> dict[str, CpioMember]:
    return read_newc(built.kit.initrd.read_bytes())


def test_build_reports_progress_and_versions(built: Built) -> None:
    assert any(m.startswith("downloading linux-image-") for m in built.messages)
    assert any(m.startswith("unpacking python3.11-minimal") for m in built.messages)
    assert "packing initramfs" in built.messages
    kit = built.kit
    assert kit.directory == built.cache / kit.digest
    assert kit.versions["python"].startswith("3.11.")
    assert kit.versions["kernel"].endswith("-amd64")
    assert kit.versions["busybox"][0].isdigit()
    assert kit.sizes == {"kernel": kit.kernel.stat().st_size, "initrd": kit.initrd.stat().st_size}
    assert _kernel.has_pvh_entry(kit.kernel.read_bytes())


def test_initramfs_has_init_agent_python_and_busybox(initramfs: dict[str, CpioMember]) -> None:
    for path in ("init", "bin/busybox", "usr/bin/python3.11", "kelpie/guest/agent.py"):
        assert stat.S_ISREG(initramfs[path].mode), path
        assert initramfs[path].data
    assert stat.S_IMODE(initramfs["init"].mode) == 0o755
    assert initramfs["init"].data == INIT_SH.read_bytes()
    source = Path(__file__).parents[1] / "src/kelpie"
    assert initramfs["kelpie/protocol.py"].data == (source / "protocol.py").read_bytes()
    assert "kelpie/__pycache__/protocol.cpython-311.pyc" in initramfs
    for module in (source / "guest").glob("*.py"):
        assert initramfs[f"kelpie/guest/{module.name}"].data == module.read_bytes()
        pyc = f"kelpie/guest/__pycache__/{module.stem}.cpython-311.pyc"
        assert (pyc in initramfs) == (module.name != "agent.py"), pyc  # a script is not imported
    # init runs the agent's script from its bytecode, compiled from the script as shipped
    assert b'AGENT=/kelpie/guest/agent.pyc\n' in initramfs["init"].data
    script_pyc = initramfs["kelpie/guest/agent.pyc"].data
    assert script_pyc[:4] == importlib.util.MAGIC_NUMBER
    code = marshal.loads(script_pyc[16:])
    assert code.co_filename == "/kelpie/guest/agent.py"
    shipped = compile((source / "guest/agent.py").read_text(), "x", "exec")
    assert (code.co_consts, code.co_names) == (shipped.co_consts, shipped.co_names)
    for applet in ("sh", "echo", "cat", "sleep", "tty", "stty", "insmod", "mount"):
        assert initramfs[f"bin/{applet}"].data == b"busybox", applet
    assert initramfs["usr/bin/python3"].data == b"python3.11"
    assert initramfs["lib64/ld-linux-x86-64.so.2"].data.endswith(b"ld-linux-x86-64.so.2")
    assert "lib/x86_64-linux-gnu/libc.so.6" in initramfs
    assert initramfs["dev/console"].rdev == (5, 1)


def test_stdlib_is_trimmed_and_precompiled(initramfs: dict[str, CpioMember]) -> None:
    stdlib = "usr/lib/python3.11/"
    sources = [p for p in initramfs if p.startswith(stdlib) and p.endswith(".py")]
    assert f"{stdlib}json/decoder.py" in sources and f"{stdlib}os.py" in sources
    assert f"{stdlib}asyncio/__init__.py" not in initramfs
    assert 20 < len(sources) < 150
    for source in sources:
        folder, name = source.rsplit("/", 1)
        assert f"{folder}/__pycache__/{name[:-3]}.cpython-311.pyc" in initramfs, source
    assert f"{stdlib}lib-dynload/termios.cpython-311-x86_64-linux-gnu.so" in initramfs
    assert not any("_hashlib" in p or "libcrypto" in p for p in initramfs)


def test_module_lists_are_in_dependency_order(initramfs: dict[str, CpioMember]) -> None:
    def names(group: str) -> list[str]:
        lines = initramfs[f"etc/kelpie/modules.{group}"].data.decode().splitlines()
        for line in lines:
            assert line.split()[1].lstrip("/") in initramfs, line
        return [line.split()[0] for line in lines]

    core = names("core")
    assert core.index("virtio_ring") < core.index("virtio_mmio")
    # the kernel's RNG is seeded first: the agent's Python waits for it at start
    assert core.index("virtio_mmio") < core.index("virtio_rng") < core.index("virtio_console")
    blk = names("blk")
    assert blk.index("jbd2") < blk.index("ext4") and "crc32c_generic" in blk
    assert names("9p")[-1] == "9p" and "9pnet_virtio" in names("9p")
    assert names("net")[-1] == "virtio_net"
    assert not set(core) & set(blk)


def test_cache_hit_does_no_work(built: Built) -> None:
    stamp = {p: p.stat().st_mtime_ns for p in built.kit.directory.iterdir()}
    messages: list[str] = []
    again = build_guestkit(built.cache, progress=messages.append)
    assert again == built.kit
    assert messages == []
    assert {p: p.stat().st_mtime_ns for p in again.directory.iterdir()} == stamp
    assert load_guestkit(built.cache) == built.kit
    assert load_guestkit(built.cache, digest=built.kit.digest) == built.kit
    assert load_guestkit(built.cache, digest="0" * 64) is None
    with pytest.raises(GuestKitError, match="digest"):
        load_guestkit(built.cache, digest="../etc")


def test_changed_agent_changes_the_digest(built: Built, tmp_path: Path) -> None:
    source = Path(__file__).parents[1] / "src/kelpie"
    module = tmp_path / "_session.py"
    module.write_bytes((source / "guest/_session.py").read_bytes() + b"\n# changed\n")
    assert load_guestkit(built.cache, agent_files={"guest/_session.py": module}) is None
    unchanged = {"guest/agent.py": source / "guest/agent.py"}
    assert load_guestkit(built.cache, agent_files=unchanged) == built.kit


def test_rebuild_gives_identical_bytes(built: Built) -> None:
    again = build_guestkit(built.cache, force=True)
    assert again.digest == built.kit.digest
    assert file_hashes(again) == built.hashes
    assert not list(built.cache.glob(".build-*")) and not list(built.cache.glob(".old-*"))


# --- a real boot --------------------------------------------------------------------------


def exec_in_guest(
    sock: socket.socket, request_id: int, argv: list[str]
) -> tuple[dict[str, Any], bytes]:
    """Run argv through the agent; return its REPLY and the command's stdout + stderr."""
    frame = protocol.encode_json(
        protocol.FrameType.REQUEST, request_id, {"op": "exec", "argv": argv}
    )
    sock.sendall(frame)
    decoder = protocol.FrameDecoder()
    output = b""
    sock.settimeout(30)
    while True:
        decoder.feed(sock.recv(65536))
        for item in decoder.frames():
            if not isinstance(item, protocol.Frame) or item.request_id != request_id:
                continue
            if item.ftype in (protocol.FrameType.STDOUT, protocol.FrameType.STDERR):
                output += item.payload
            elif item.ftype in (protocol.FrameType.REPLY, protocol.FrameType.ERROR):
                return item.json(), output


@pytest.fixture
def vm_workdir() -> Iterator[Path]:
    # Short: unix socket paths must stay under 108 bytes.
    path = Path(f"/tmp/kelpie-gk-{os.getpid()}")
    path.mkdir(exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.vm
def test_kit_boots_to_a_serving_agent(guestkit: GuestKit, vm_workdir: Path) -> None:
    """Boot the session's kit (conftest: skips, or fails when KELPIE_REQUIRE_BACKENDS names
    qemu, when QEMU or the kit is missing) and talk to its agent."""
    cmdline = kernel_cmdline(hostname="gk-test")
    command = _bootcheck.qemu_command(guestkit, vm_workdir, cmdline=cmdline)
    with _bootcheck.boot(command, vm_workdir) as run:
        _seconds, hello = run.agent_hello(timeout=90)
        assert hello["hostname"] == "gk-test" and hello["root"] == "/"
        sock = run.connect_agent(timeout=1)
        reply, output = exec_in_guest(sock, 2, ["sh", "-c", "echo hi; cat /proc/1/comm; tty"])
        assert reply["exit_code"] == 1  # `tty` without a terminal
        assert output == b"hi\ninit\nnot a tty\n"
        shutdown = {"op": "shutdown"}
        sock.sendall(protocol.encode_json(protocol.FrameType.REQUEST, 3, shutdown))
        assert run.process.wait(timeout=60) == 0
    assert "kelpie-init" in run.console()
