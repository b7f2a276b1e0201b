"""The guest kit's lock: the exact Debian packages a kit is built from, per architecture.

``kit.lock.json`` (beside this module) names the archive suites and, per Debian
architecture, each package the kit wants with the version and sha256 it was locked at. A
kit's digest comes from the lock, so a cached kit is found without the network. When a
locked version is gone from the archive (Debian keeps only the current one of each suite),
the build takes the suite's current version instead, verified through the same signed
chain, and says so; ``kelpie guestkit lock --refresh`` records the current versions.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from kelpie._fsutil import write_atomic
from kelpie.guestkit._archive import ArchiveError, DebianArchive, Package, Source

LOCK = Path(__file__).with_name("kit.lock.json")
LOCK_FORMAT = 1
DEBIAN_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
"""Kelpie's architecture names (the kernel's) and Debian's."""
USERLAND_PACKAGES = (
    "busybox-static",
    "libc6",
    "libexpat1",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3.11-minimal",
    "zlib1g",
)
"""Userland packages. Their shared-library needs are checked after unpacking (DT_NEEDED),
so a missing package here fails the build instead of the guest."""
DEFAULT_SOURCES = (
    Source("debian", "http://deb.debian.org/debian", "bookworm"),
    Source("debian-security", "http://deb.debian.org/debian-security", "bookworm-security"),
)


def kernel_metapackage(debian_arch: str) -> str:
    return f"linux-image-{debian_arch}"


def _kernel_pattern(debian_arch: str) -> str:
    return rf"linux-image-[0-9][0-9.]*-[0-9]+-{debian_arch}"


@dataclasses.dataclass(frozen=True)
class Locked:
    """A package the kit wants (``want``: a name, or the kernel's metapackage) and the
    version it is locked at."""

    want: str
    package: Package


@dataclasses.dataclass(frozen=True)
class KitLock:
    """The archive suites and, per Debian architecture, the locked packages (kernel first)."""

    sources: tuple[Source, ...]
    arches: Mapping[str, tuple[Locked, ...]]

    def packages(self, debian_arch: str) -> tuple[Locked, ...]:
        try:
            return self.arches[debian_arch]
        except KeyError:
            raise ArchiveError(
                f"the guest kit's lock has no packages for {debian_arch} (it has "
                f"{', '.join(sorted(self.arches)) or 'none'}): run `kelpie guestkit lock "
                f"--refresh --arch {debian_arch}`") from None

    def to_json(self) -> bytes:
        document = {
            "format": LOCK_FORMAT,
            "sources": [dataclasses.asdict(s) for s in self.sources],
            "arches": {
                arch: [{"want": item.want, "name": item.package.name,
                        "version": item.package.version, "sha256": item.package.sha256,
                        "size": item.package.size, "filename": item.package.filename,
                        "source": item.package.source} for item in items]
                for arch, items in sorted(self.arches.items())
            },
        }
        return (json.dumps(document, indent=1) + "\n").encode()


def read_lock(path: Path = LOCK) -> KitLock:
    try:
        document = json.loads(path.read_text())
        if document.get("format") != LOCK_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {LOCK_FORMAT}")
        sources = tuple(Source(**s) for s in document["sources"])
        arches = {
            arch: tuple(Locked(e["want"], Package(e["name"], e["version"], e["sha256"],
                                                  e["size"], e["filename"], e["source"]))
                        for e in entries)
            for arch, entries in document["arches"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"{path} is not a guest kit lock: {exc}") from exc
    return KitLock(sources, arches)


def write_lock(lock: KitLock, path: Path = LOCK) -> None:
    write_atomic(path, lock.to_json())


def wanted(debian_arch: str) -> tuple[str, ...]:
    """What a kit of ``debian_arch`` is made of: the kernel's metapackage, then userland."""
    return (kernel_metapackage(debian_arch), *USERLAND_PACKAGES)


def current(archive: DebianArchive, want: str) -> Package:
    """The archive's current package for ``want`` (a kernel metapackage becomes the
    versioned kernel package it depends on)."""
    package = archive.candidate(want)
    if want != kernel_metapackage(archive.arch):
        return package
    pattern = _kernel_pattern(archive.arch)
    for alternative in re.split(r"[,|]", package.depends):
        name = alternative.strip().split(" ", 1)[0]
        if re.fullmatch(pattern, name):
            return archive.candidate(name)
    raise ArchiveError(f"package {package.name} {package.version} does not depend on a "
                       f"package matching {pattern!r} (its Depends: "
                       f"{package.depends or 'nothing'})")


def refreshed(lock: KitLock, archive: DebianArchive) -> KitLock:
    """``lock`` with the archive's current packages for ``archive.arch``."""
    items = tuple(Locked(want, current(archive, want)) for want in wanted(archive.arch))
    return KitLock(lock.sources, {**lock.arches, archive.arch: items})


def vouched_packages(lock: KitLock, archive: DebianArchive,
                     say: Callable[[str], None]) -> tuple[Package, ...]:
    """The locked packages of ``archive.arch`` as the signed archive lists them now; a
    locked version that is gone is replaced by the current one (and said)."""
    packages = []
    for item in lock.packages(archive.arch):
        listed = archive.vouched(item.package)
        if listed is None:
            listed = current(archive, item.want)
            say(f"{item.package.name} {item.package.version} (locked) is gone from the "
                f"archive; using {listed.name} {listed.version}, verified the same way "
                f"(`kelpie guestkit lock --refresh` records it)")
        packages.append(listed)
    return tuple(packages)
