"""The VM's own root directory: where its commands run, shared with the guest over virtio-fs.

libkrun shares directories with its guest (virtio-fs), so a VM's root is a directory. Its
source, from the VM's ``root_disk``:

* a directory: that directory;
* an image's ext4 disk from the image store (``<store>/ext4/<hex>.ext4``, what the runtime
  passes for every backend): the directory the store built it from, which it keeps beside
  it (``<store>/rootfs/<hex>/``; the ext4 is made from it by ``mke2fs -d``);
* none: the guest kit's own tree (busybox and Python), as a QEMU guest without a root disk
  runs its commands in the initramfs;
* any other file: refused, since libkrun cannot mount an ext4 file as a directory.

The source is never written: the guest, root in its VM, writes to its own copy in the VM
directory (``rootfs/``), made on first start and kept across stops, as QEMU keeps a VM's
disk overlay. ``cp --reflink=auto`` makes that copy cheap on filesystems that share
extents (btrfs, XFS); elsewhere it costs a full copy of the image.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from kelpie.vm import BootError, ConfigError

VM_ROOT = "rootfs"
"""The VM's root directory, in its VM directory."""


def root_source(root_disk: Path | None, kit_root: Path) -> Path:
    """The directory a VM's root is copied from (see the module docstring)."""
    if root_disk is None:
        return kit_root
    if root_disk.is_dir():
        return root_disk
    store_form = root_disk.parent.parent / "rootfs" / root_disk.name.removesuffix(".ext4")
    if root_disk.parent.name == "ext4" and root_disk.suffix == ".ext4" and store_form.is_dir():
        return store_form
    if not root_disk.exists():
        raise BootError(f"root disk {root_disk} does not exist")
    raise ConfigError([
        f"root_disk {root_disk} is a disk image; libkrun shares a directory with its guest "
        f"(virtio-fs) and this file has no image-store directory beside it "
        f"({store_form} is missing); give root_disk as a directory holding the root "
        f"filesystem, or create the sandbox from an image"
    ])


async def prepare_root(source: Path, workdir: Path) -> Path:
    """The VM's root directory in ``workdir``, copied from ``source`` if it has none yet."""
    root = workdir / VM_ROOT
    if root.is_dir():
        return root  # kept across stop and start, like a disk
    partial = workdir / f".{VM_ROOT}.partial"
    await asyncio.to_thread(shutil.rmtree, partial, True)
    process = await asyncio.create_subprocess_exec(
        "cp", "-a", "--reflink=auto", "--", f"{source}/.", str(partial),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        await asyncio.to_thread(shutil.rmtree, partial, True)
        raise BootError(f"cannot copy the root directory {source} to {root}: "
                        f"{err.decode(errors='replace').strip()} (is the disk full?)")
    partial.rename(root)
    return root


def set_aside(workdir: Path) -> Path | None:
    """Move the VM's root directory out of the way (a restore boots a fresh one); where
    it went, or None when there was none. :func:`put_back` undoes it."""
    root, kept = workdir / VM_ROOT, workdir / f".{VM_ROOT}.before-restore"
    if not root.is_dir():
        return None
    shutil.rmtree(kept, ignore_errors=True)
    root.rename(kept)
    return kept


def put_back(workdir: Path, kept: Path | None) -> None:
    """Undo :func:`set_aside`: the earlier root directory (or none) is the VM's again."""
    root = workdir / VM_ROOT
    shutil.rmtree(root, ignore_errors=True)
    if kept is not None:
        kept.rename(root)
