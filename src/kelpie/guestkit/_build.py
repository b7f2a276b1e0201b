"""Build and cache the guest kit: a Debian kernel plus a busybox + Python initramfs.

A kit is identified by the SHA256 of everything that goes into it (package versions and
their `.deb` sums, init.sh, the agent's files, the module and import lists, the builder's
own code). It lives in `<cache>/<digest>/` and is built once: in a temporary directory,
then renamed into place, under a lock so concurrent builders do the work once.

    build_guestkit()            resolve inputs -> cached? return it
                                 -> download .debs -> unpack -> stage tree -> cpio -> rename
    load_guestkit(digest=...)   the kit with that digest, if it is in the cache
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from kelpie._exceptions import KelpieError
from kelpie._fsutil import exclusive_lock
from kelpie.guestkit import _cpio, _python
from kelpie.guestkit._arch import ArchError, GuestArch, guest_arch, host_arch
from kelpie.guestkit._archive import ArchiveError, DebianArchive, Package
from kelpie.guestkit._kernel import KernelImageError, extract_vmlinux
from kelpie.guestkit._lock import KitLock, read_lock, vouched_packages
from kelpie.guestkit._modules import MODULE_GROUPS, ModuleError, ModuleTree, plan_groups

#: Bump when the kit's layout or contents change in a way the digest would not notice.
BUILDER_VERSION = 1

#: The agent's files keep their paths below the `kelpie` package in the guest's /kelpie:
#: the wire protocol and every module of the guest package, whose script AGENT_SCRIPT
#: starts the agent (from its bytecode, AGENT_SCRIPT_PYC).
AGENT_PROTOCOL = "protocol.py"
AGENT_PACKAGE = "guest"
AGENT_SCRIPT = f"{AGENT_PACKAGE}/agent.py"
#: The script's bytecode, which init runs: no parsing or compiling at boot, where the code
#: of Python's parser and compiler would be translated by TCG for this one use.
AGENT_SCRIPT_PYC = f"{AGENT_PACKAGE}/agent.pyc"
AGENT_DIR = PurePosixPath("kelpie")

#: The modules whose code decides what a kit contains (hashed into every digest).
_BUILDER_SOURCES = (
    "_arch.py",
    "_archive.py",
    "_build.py",
    "_cpio.py",
    "_elf.py",
    "_kernel.py",
    "_modules.py",
    "_python.py",
)

Progress = Callable[[str], None]
_DIGEST = re.compile(r"[0-9a-f]{64}")


class GuestKitError(KelpieError, RuntimeError):
    """The guest kit could not be built or loaded; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class GuestKit:
    """A built guest kit: boot `kernel` with `initrd`; `digest` names exactly these inputs.

    `kernel` is an uncompressed ELF vmlinux with a PVH entry point (QEMU `-kernel`,
    Firecracker and Cloud Hypervisor boot it directly); `initrd` an uncompressed newc
    cpio archive.
    `versions` holds the kernel release and the busybox and Python versions inside;
    `sizes` the byte sizes of the kernel and initramfs.
    """

    kernel: Path
    initrd: Path
    digest: str
    versions: Mapping[str, str] = dataclasses.field(hash=False)
    sizes: Mapping[str, int] = dataclasses.field(hash=False)
    arch: str = dataclasses.field(default_factory=host_arch)
    """The guest architecture it boots (``x86_64``, ``aarch64``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", MappingProxyType(dict(self.versions)))
        object.__setattr__(self, "sizes", MappingProxyType(dict(self.sizes)))

    @property
    def directory(self) -> Path:
        """The cache directory holding this kit's files."""
        return self.kernel.parent


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """Everything a kit is made from; its digest names the kit."""

    kernel_package: Package
    packages: tuple[Package, ...]
    init_script: bytes
    agent_files: tuple[tuple[str, bytes], ...]
    arch: GuestArch

    @property
    def all_packages(self) -> tuple[Package, ...]:
        return (self.kernel_package, *self.packages)

    def digest(self) -> str:
        description = {
            "builder": BUILDER_VERSION,
            "arch": self.arch.name,
            "builder_sources": _builder_sources_digest(),
            "packages": [[p.name, p.version, p.sha256] for p in self.all_packages],
            "init": _sha256(self.init_script),
            "agent": {name: _sha256(data) for name, data in self.agent_files},
            "modules": {group: list(roots) for group, roots in MODULE_GROUPS.items()},
            "python": {
                "base": list(_python.BASE_IMPORTS),
                "excluded": sorted(_python.EXCLUDED),
            },
        }
        return _sha256(json.dumps(description, sort_keys=True).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _builder_sources_digest() -> str:
    """Hash of the builder's own code, so a changed builder never reuses an old kit."""
    package = resources.files("kelpie.guestkit")
    digest = hashlib.sha256()
    for name in _BUILDER_SOURCES:
        digest.update(name.encode() + b"\0" + package.joinpath(name).read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/kelpie/guestkit`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kelpie" / "guestkit"


def _quiet(_message: str) -> None:
    pass


# --- inputs -------------------------------------------------------------------------------


def _agent_sources() -> dict[str, Traversable]:
    """The agent's files in the installed `kelpie` package, by their path below /kelpie."""
    kelpie = resources.files("kelpie")
    sources: dict[str, Traversable] = {AGENT_PROTOCOL: kelpie.joinpath(AGENT_PROTOCOL)}
    with contextlib.suppress(OSError):
        for entry in kelpie.joinpath(AGENT_PACKAGE).iterdir():
            if entry.name.endswith(".py") and entry.is_file():
                sources[f"{AGENT_PACKAGE}/{entry.name}"] = entry
    return sources


def _agent_files(overrides: Mapping[str, Path] | None) -> tuple[tuple[str, bytes], ...]:
    sources: dict[str, Traversable | Path] = dict(_agent_sources())
    if AGENT_SCRIPT not in sources:
        raise GuestKitError(
            f"the guest agent package has no {AGENT_SCRIPT} in {resources.files('kelpie')}; "
            f"the kit needs kelpie/{AGENT_PROTOCOL} and the kelpie/{AGENT_PACKAGE}/ package: "
            "reinstall kelpie"
        )
    unknown = sorted(set(overrides or {}) - set(sources))
    if unknown:
        raise GuestKitError(
            f"agent_files names {unknown}, which are not files of the guest agent; "
            f"expected some of {sorted(sources)}"
        )
    sources.update(overrides or {})
    files = []
    for guest_name, source in sorted(sources.items()):
        try:
            files.append((guest_name, source.read_bytes()))
        except OSError as exc:
            raise GuestKitError(
                f"the guest agent file {guest_name} could not be read from {source} ({exc}); "
                f"the kit needs kelpie/{AGENT_PROTOCOL} and the kelpie/{AGENT_PACKAGE}/ package"
            ) from exc
    return tuple(files)


def _inputs(lock: KitLock, agent_files: Mapping[str, Path] | None, arch: GuestArch,
            packages: tuple[Package, ...] | None = None) -> _Inputs:
    """The kit's inputs: the locked packages (or ``packages``), init.sh, the agent."""
    if packages is None:
        try:
            packages = tuple(item.package for item in lock.packages(arch.debian))
        except ArchiveError as exc:
            raise GuestKitError(str(exc)) from exc
    init_script = resources.files("kelpie.guestkit").joinpath("init.sh").read_bytes()
    return _Inputs(packages[0], packages[1:], init_script, _agent_files(agent_files), arch)


def _arch(name: str | None) -> GuestArch:
    try:
        return guest_arch(name)
    except ArchError as exc:
        raise GuestKitError(str(exc)) from exc


def _lock() -> KitLock:
    try:
        return read_lock()
    except ArchiveError as exc:
        raise GuestKitError(f"{exc}; reinstall kelpie") from exc


# --- cache --------------------------------------------------------------------------------



def _read_kit(directory: Path) -> GuestKit | None:
    """The kit stored in `directory`, or None if it is absent or incomplete."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        arch = guest_arch(manifest.get("arch"))
        kit = GuestKit(
            kernel=directory / arch.kernel_file,
            initrd=directory / "initrd.img",
            digest=manifest["digest"],
            versions=manifest["versions"],
            sizes=manifest["sizes"],
            arch=arch.name,
        )
        if (
            kit.digest != directory.name
            or kit.kernel.stat().st_size != kit.sizes["kernel"]
            or kit.initrd.stat().st_size != kit.sizes["initrd"]
        ):
            return None
    except (OSError, ValueError, KeyError, TypeError, ArchError):
        return None
    return kit


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / ".build.lock"):
        yield


def load_guestkit(
    cache_dir: Path | None = None,
    *,
    digest: str | None = None,
    agent_files: Mapping[str, Path] | None = None,
    arch: str | None = None,
) -> GuestKit | None:
    """The cached kit for `digest` or, by default, for the current inputs; None if not built.

    Without `digest`, the kit of the current inputs (the locked packages), found without
    the network.
    """
    cache_dir = cache_dir or default_cache_dir()
    if digest is None:
        digest = _inputs(_lock(), agent_files, _arch(arch)).digest()
    elif not _DIGEST.fullmatch(digest):
        raise GuestKitError(f"guest kit digest {digest!r} is not 64 lowercase hex digits")
    return _read_kit(cache_dir / digest)


def build_guestkit(
    cache_dir: Path | None = None,
    *,
    progress: Progress | None = None,
    force: bool = False,
    agent_files: Mapping[str, Path] | None = None,
    arch: str | None = None,
) -> GuestKit:
    """Return the guest kit for the current inputs, building it first if it is not cached.

    `progress` receives one-line messages (downloads, unpacking, packing). `force` rebuilds
    even a cached kit. `agent_files` replaces some of the agent's files (by their path
    below /kelpie: `protocol.py`, `guest/agent.py`, `guest/_link.py`...) for development
    and tests; normally they come from the installed `kelpie` package. `arch` is the
    guest architecture (default: the host's); another one's binaries run under QEMU's
    user-mode emulator while the kit is built. Raises GuestKitError, naming the package or
    file at fault.
    """
    cache_dir = cache_dir or default_cache_dir()
    say = progress or _quiet
    lock = _lock()
    guest = _arch(arch)
    inputs = _inputs(lock, agent_files, guest)
    if not force and (kit := _read_kit(cache_dir / inputs.digest())) is not None:
        return kit
    with _build_lock(cache_dir):
        if not force and (kit := _read_kit(cache_dir / inputs.digest())) is not None:
            return kit
        started = time.monotonic()
        archive = DebianArchive(lock.sources, guest.debian, cache_dir, progress=say)
        try:
            vouched = vouched_packages(lock, archive, say)
            if vouched != inputs.all_packages:  # a locked version is gone: another kit
                inputs = _inputs(lock, agent_files, guest, vouched)
                if not force and (kit := _read_kit(cache_dir / inputs.digest())) is not None:
                    return kit
            kit = _build(inputs, inputs.digest(), archive, cache_dir, say)
        except (ArchiveError, ArchError, _python.PythonKitError, ModuleError,
                KernelImageError) as exc:
            raise GuestKitError(str(exc)) from exc
        finally:
            archive.close()
        say(f"guest kit {kit.digest[:12]} built in {time.monotonic() - started:.1f} s")
        return kit


# --- building -----------------------------------------------------------------------------


def _build(inputs: _Inputs, digest: str, archive: DebianArchive, cache_dir: Path,
           say: Progress) -> GuestKit:
    debs = {p: archive.download(p, cache_dir / "debs") for p in inputs.all_packages}
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as work_name:
        work = Path(work_name)
        unpacked, stage, out = work / "unpacked", work / "stage", work / digest
        for package in inputs.all_packages:
            say(f"unpacking {package.name}")
            _unpack(debs[package], unpacked)
        for directory in (stage, out):
            directory.mkdir()
        release, image = _find_kernel(unpacked)
        say("selecting kernel modules, stdlib files and libraries")
        modules = _stage_modules(unpacked, stage, release)
        busybox_version = _stage_busybox(unpacked, stage, inputs.arch)
        agent_paths = _stage_agent(stage, inputs.agent_files)
        python_version = _stage_python(unpacked, stage, agent_paths, inputs.arch)
        versions = {"kernel": release, "busybox": busybox_version, "python": python_version}
        _stage_etc(stage, digest, versions, modules)
        _stage_file(stage, PurePosixPath("init"), inputs.init_script, 0o755)
        say("packing initramfs")
        _pack(stage, out / "initrd.img")
        say("unpacking the kernel image")
        kernel = image.read_bytes()
        if inputs.arch.name == "x86_64":  # a bzImage: booted faster uncompressed (PVH)
            kernel = extract_vmlinux(kernel)
        (out / inputs.arch.kernel_file).write_bytes(kernel)
        _write_manifest(out, inputs, digest, versions, modules)
        return _publish(out, cache_dir / digest)


def _write_manifest(
    out: Path,
    inputs: _Inputs,
    digest: str,
    versions: Mapping[str, str],
    modules: Mapping[str, list[str]],
) -> None:
    """manifest.json: what `_read_kit` loads, plus the inputs, for people reading it."""
    manifest = {
        "digest": digest,
        "versions": dict(versions),
        "sizes": {
            "kernel": (out / inputs.arch.kernel_file).stat().st_size,
            "initrd": (out / "initrd.img").stat().st_size,
        },
        "packages": {p.name: p.version for p in inputs.all_packages},
        "modules": dict(modules),
        "builder": BUILDER_VERSION,
        "arch": inputs.arch.name,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _publish(built: Path, final: Path) -> GuestKit:
    """Move a finished kit into place (replacing an old copy when forced)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(built, final)
    kit = _read_kit(final)
    if kit is None:
        raise GuestKitError(f"the kit just built in {final} is unreadable; remove it and retry")
    return kit


def _unpack(deb: Path, destination: Path) -> None:
    """Extract a `.deb`'s files into `destination` (no maintainer scripts run): with
    dpkg-deb where it exists, else with python-debian (hosts without dpkg)."""
    if shutil.which("dpkg-deb"):
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(destination)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise GuestKitError(f"dpkg-deb -x {deb.name} failed: {done.stderr.strip()}")
        return
    from debian.debfile import DebError, DebFile

    try:
        with DebFile(str(deb)) as package:
            package.data.tgz().extractall(destination, filter="tar")
    except (DebError, OSError, tarfile.TarError) as exc:
        raise GuestKitError(f"cannot unpack {deb.name}: {exc}") from exc


def _find_kernel(unpacked: Path) -> tuple[str, Path]:
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestKitError(f"expected one kernel image in the kernel package, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    if not (unpacked / "lib" / "modules" / release).is_dir():
        raise GuestKitError(f"the kernel package has no modules for {release}")
    return release, kernels[0]


def _stage_file(stage: Path, guest: PurePosixPath, data: bytes, mode: int = 0o644) -> None:
    path = stage / guest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _stage_copy(unpacked: Path, stage: Path, guest: PurePosixPath) -> None:
    """Copy one file or symlink from the unpacked tree to the same place in the stage."""
    source, target = unpacked / guest, stage / guest
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        target.symlink_to(os.readlink(source))
    else:
        shutil.copyfile(source, target)
        target.chmod(source.stat().st_mode & 0o777)


def _stage_modules(unpacked: Path, stage: Path, release: str) -> dict[str, list[str]]:
    """Copy the needed `.ko` files and write one load-order list per group."""
    moddir = PurePosixPath("lib/modules") / release
    plan = plan_groups(ModuleTree(unpacked / moddir), MODULE_GROUPS)
    for group, modules in plan.items():
        lines = []
        for module in modules:
            guest = moddir / module.path
            if not (stage / guest).exists():
                _stage_copy(unpacked, stage, guest)
            lines.append(f"{module.name} /{guest}\n")
        _stage_file(stage, PurePosixPath(f"etc/kelpie/modules.{group}"), "".join(lines).encode())
    return {group: [m.name for m in modules] for group, modules in plan.items()}


def _run_busybox(busybox: Path, arch: GuestArch, *args: str) -> str:
    try:
        done = subprocess.run([*arch.runner(), str(busybox), *args], capture_output=True,
                              text=True, check=False)
    except OSError as exc:
        raise GuestKitError(f"cannot run the guest's busybox on this host ({exc})") from exc
    return done.stdout


def _stage_busybox(unpacked: Path, stage: Path, arch: GuestArch) -> str:
    """Busybox with a /bin symlink for every applet; returns its version."""
    busybox = PurePosixPath("bin/busybox")
    _stage_copy(unpacked, stage, busybox)
    applets = set(_run_busybox(unpacked / busybox, arch, "--list").split()) - {"busybox"}
    if "sh" not in applets:
        raise GuestKitError(f"{unpacked / busybox} --list names no 'sh' applet")
    for applet in sorted(applets):
        (stage / "bin" / applet).symlink_to("busybox")
    (stage / "sbin").symlink_to("bin")
    (stage / "usr/bin").mkdir(parents=True, exist_ok=True)
    (stage / "usr/bin/env").symlink_to("../../bin/busybox")
    words = _run_busybox(unpacked / busybox, arch, "--help").split()
    return words[1].lstrip("v") if len(words) > 1 and words[0] == "BusyBox" else "unknown"


def _stage_agent(stage: Path, agent_files: tuple[tuple[str, bytes], ...]) -> list[Path]:
    """Write the agent's files to /kelpie; returns their paths in the stage."""
    paths = []
    for name, data in agent_files:
        _stage_file(stage, AGENT_DIR / name, data)
        paths.append(stage / AGENT_DIR / name)
    return paths


def _stage_python(unpacked: Path, stage: Path, agent_paths: list[Path],
                  arch: GuestArch) -> str:
    """The interpreter, the stdlib files the agent imports and their shared libraries,
    with bytecode for them and for the agent's modules. Returns the Python version."""
    required, optional = _python.agent_imports(agent_paths)
    required = sorted(set(required) | set(_python.BASE_IMPORTS))
    interpreter = _python.GuestPython(unpacked, arch)
    selection = interpreter.discover(required, optional, _python.EXCLUDED)
    binaries = [_python.PYTHON_BIN, *(f for f in selection.files if f.suffix == ".so")]
    for guest in sorted({*binaries, *selection.files}):
        _stage_copy(unpacked, stage, guest)
    for library in _python.library_closure(unpacked, binaries, arch):
        for hop in _python.symlink_chain(unpacked, library):
            if not (stage / hop).exists() and not (stage / hop).is_symlink():
                _stage_copy(unpacked, stage, hop)
    (stage / "usr/bin/python3").symlink_to("python3.11")
    sources = {stage / f: f for f in selection.files if f.suffix == ".py"}
    for path in agent_paths:
        sources[path] = PurePosixPath(path.relative_to(stage).as_posix())
    script = stage / AGENT_DIR / AGENT_SCRIPT
    interpreter.compile(sources, scripts={script: stage / AGENT_DIR / AGENT_SCRIPT_PYC})
    _python.GuestPython(stage, arch).verify(required)
    return selection.version


def _stage_etc(
    stage: Path, digest: str, versions: Mapping[str, str], modules: Mapping[str, list[str]]
) -> None:
    for directory in ("dev", "proc", "sys", "tmp", "run", "newroot", "root", "mnt", "var/tmp"):
        (stage / directory).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    (stage / "var/tmp").chmod(0o1777)
    (stage / "root").chmod(0o700)
    etc = PurePosixPath("etc")
    _stage_file(stage, etc / "passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    _stage_file(stage, etc / "group", b"root:x:0:\ntty:x:5:\n")
    _stage_file(stage, etc / "resolv.conf", b"")
    _stage_file(stage, etc / "kelpie/digest", f"{digest}\n".encode())
    info = {"digest": digest, "versions": dict(versions), "modules": dict(modules)}
    _stage_file(stage, etc / "kelpie/kit.json", json.dumps(info, sort_keys=True).encode())


def _pack(stage: Path, output: Path) -> None:
    """Write the stage as an uncompressed newc cpio archive.

    Uncompressed because gzip saved nothing measurable at boot and zstd cost ~0.2 s under
    TCG: the kernel unpacks the initramfs on an emulated CPU while it initialises
    other things.
    """
    entries = [*_cpio.tree_entries(stage), _cpio.char_device("dev/console", 5, 1)]
    with output.open("wb") as file:
        _cpio.write_archive(file, entries)
