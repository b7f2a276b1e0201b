"""Growing the root file system, online, after the host made its disk bigger."""

from __future__ import annotations

import fcntl
import os
import struct

from ._common import OpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

#: _IOW('f', 16, __u64): grow a mounted ext4 file system to a number of blocks.
EXT4_IOC_RESIZE_FS: Final = 0x40086610
SECTOR: Final = 512


def _mount_type(root: str) -> str | None:
    """The file system type mounted at ``root`` (the last mount there wins)."""
    found = None
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == root:
                found = fields[2]
    return found


def _device_bytes(root: str) -> int:
    """The size of the block device the file system at ``root`` lives on."""
    dev = os.stat(root).st_dev
    path = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/size"
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip()) * SECTOR
    except (OSError, ValueError):
        raise OpError("ENODEV", f"the file system at {root} is not on a block device") from None


def op_grow_fs(root: str, rid: int, f: dict[str, Any]) -> dict[str, Any]:
    """Grow the ext4 file system at ``root`` to ``size`` bytes (whole blocks).

    EAGAIN while the kernel has not seen the disk's new size yet (the host's resize
    reaches the guest as an interrupt): the host asks again.
    """
    size = f["size"]
    kind = _mount_type(root)
    if kind != "ext4":
        raise OpError("EOPNOTSUPP", f"the file system at {root} is {kind or 'not a mount'}; "
                      "only ext4 grows online")
    device = _device_bytes(root)
    if device < size:
        raise OpError("EAGAIN", f"the disk is {device} bytes, not yet the {size} asked for")
    block = os.statvfs(root).f_bsize
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("=Q", size // block))
    except OSError as exc:
        raise OpError.from_os(exc, f"cannot grow the file system at {root}") from None
    finally:
        os.close(fd)
    stats = os.statvfs(root)
    return {"size": stats.f_blocks * stats.f_frsize, "device_size": device}
