"""The guest kit as a directory: libkrun boots a directory over virtio-fs, not an initramfs.

The guest kit's initramfs (an uncompressed newc cpio archive, see :mod:`kelpie.guestkit`)
holds busybox, a trimmed Python and the guest agent at the paths QEMU guests see them. It
is unpacked once per kit into ``libkrun-root/`` beside the kit's files, then shared
read-only with every libkrun guest as its root. Device nodes are left out: the guest's
``/dev`` is a devtmpfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from kelpie.vm import BootError

KIT_ROOT = "libkrun-root"
"""The unpacked initramfs, in the guest kit's cache directory."""

_MAGIC = b"070701"
_HEADER = 110
_TRAILER = "TRAILER!!!"


def kit_root(initrd: Path) -> Path:
    """The unpacked tree of the kit initramfs ``initrd`` (unpacked now if not yet)."""
    final = initrd.parent / KIT_ROOT
    if final.is_dir():
        return final
    scratch = initrd.parent / f".{KIT_ROOT}.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o755)
    try:
        with initrd.open("rb") as archive:
            unpack_newc(archive, scratch)
        with contextlib.suppress(FileExistsError, OSError):
            scratch.rename(final)  # another process may have published its copy first
    except (OSError, ValueError) as exc:
        raise BootError(f"cannot unpack the guest kit's initramfs {initrd} for libkrun: "
                        f"{exc}; rebuild the guest kit (kelpie guestkit build)") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not final.is_dir():
        raise BootError(f"the guest kit's directory {final} did not appear after unpacking")
    return final


def unpack_newc(archive: BinaryIO, into: Path) -> None:
    """Write the directories, files and symbolic links of a newc archive below ``into``."""
    while True:
        header = archive.read(_HEADER)
        if len(header) != _HEADER or header[:6] != _MAGIC:
            raise ValueError("not a newc cpio archive (bad header)")
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name = archive.read(name_size)[:-1].decode()
        archive.read(-(_HEADER + name_size) % 4)
        data = archive.read(size)
        archive.read(-size % 4)
        if name == _TRAILER:
            return
        _write(into, name, mode, data)


def _write(into: Path, name: str, mode: int, data: bytes) -> None:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"archive entry {name!r} would land outside the tree")
    if relative.parts in ((), (".",)):
        return
    target = into.joinpath(*relative.parts)
    if stat.S_ISDIR(mode):
        target.mkdir(mode=0o755, exist_ok=True)
        target.chmod(stat.S_IMODE(mode))
    elif stat.S_ISLNK(mode):
        target.symlink_to(data.decode())
    elif stat.S_ISREG(mode):
        target.write_bytes(data)
        target.chmod(stat.S_IMODE(mode))
