"""The guest architectures a kit is built for, and what differs between them.

A kit for the host's architecture runs its unpacked binaries (busybox, the Python that
picks and compiles the stdlib) directly; a kit for another architecture runs them under
QEMU's user-mode emulator (Debian: ``qemu-user-static``), which needs no binfmt set-up.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
from pathlib import PurePosixPath


class ArchError(ValueError):
    """An unknown architecture, or one whose binaries this host cannot run."""


@dataclasses.dataclass(frozen=True)
class GuestArch:
    """One guest architecture: its names, its dynamic loader, its kernel image, console."""

    name: str
    """The kernel's name (``uname -m``): Kelpie's name for it."""
    debian: str
    triplet: str
    loader: PurePosixPath
    kernel_file: str
    """The kit's kernel file: an uncompressed ELF (x86_64, booted through PVH) or an
    ``Image`` (aarch64)."""
    console: str

    @property
    def library_dirs(self) -> tuple[PurePosixPath, ...]:
        return (PurePosixPath(f"lib/{self.triplet}"), PurePosixPath(f"usr/lib/{self.triplet}"),
                PurePosixPath("lib64"), PurePosixPath("lib"), PurePosixPath("usr/lib"))

    def runner(self) -> list[str]:
        """The command prefix that runs this architecture's binaries on this host."""
        if self.name == host_arch():
            return []
        for name in (f"qemu-{self.name}-static", f"qemu-{self.name}"):
            found = shutil.which(name)
            if found:
                return [found]
        raise ArchError(f"building an {self.name} guest kit on an {host_arch()} host runs its "
                        f"binaries under QEMU user-mode emulation: install qemu-user-static "
                        f"(Debian: apt-get install qemu-user-static)")


ARCHES = {
    "x86_64": GuestArch("x86_64", "amd64", "x86_64-linux-gnu",
                        PurePosixPath("lib64/ld-linux-x86-64.so.2"), "vmlinux", "ttyS0"),
    "aarch64": GuestArch("aarch64", "arm64", "aarch64-linux-gnu",
                         PurePosixPath("lib/ld-linux-aarch64.so.1"), "Image", "ttyAMA0"),
}


def host_arch() -> str:
    """This host's architecture in the kernel's spelling (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def guest_arch(name: str | None) -> GuestArch:
    """The architecture called ``name`` (None: the host's); :class:`ArchError` lists the
    known ones otherwise."""
    key = name or host_arch()
    try:
        return ARCHES[key]
    except KeyError:
        raise ArchError(f"architecture {key!r} is not one Kelpie runs guests of; known: "
                        f"{', '.join(ARCHES)}") from None
