"""The VM's own writable root disk: a copy of the base image, made once per VM.

Virtualization.framework has no copy-on-write overlay (QEMU's qcow2), and reads raw disk
images only, so each VM gets a whole copy of its (raw ext4) base image in its directory. It
persists across stop and start, like a real disk, until the VM directory goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from kelpie.vm import BootError, ConfigError

DISK_NAME = "disk.img"
_QCOW2_MAGIC = b"QFI\xfb"


def check_raw(base: Path) -> None:
    """ConfigError unless ``base`` is a readable file that is not a qcow2 image."""
    try:
        with base.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError([f"root disk {base} cannot be read: {exc.strerror or exc}"]) from exc
    if magic == _QCOW2_MAGIC:
        raise ConfigError([
            f"root disk {base} is a qcow2 image; Virtualization.framework reads raw images "
            f"only: convert it (qemu-img convert -O raw {base} disk.img) or use the qemu "
            f"backend"
        ])


async def writable_copy(base: Path, workdir: Path) -> Path:
    """The VM's writable copy of ``base`` in ``workdir`` (made now if it does not exist)."""
    disk = workdir / DISK_NAME
    if disk.exists():
        return disk  # the disk persists across stop/start
    check_raw(base)
    try:
        await asyncio.to_thread(copy_file, base, disk)
    except OSError as exc:
        raise BootError(f"cannot copy the root disk {base} to {disk}: "
                        f"{exc.strerror or exc}") from exc
    return disk


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary name, durably (fsync), so that a
    copy cut short never passes for a disk."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(source, partial)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        partial.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
