"""A reproducible writer for the "newc" cpio format the Linux kernel unpacks as initramfs.

Every entry gets uid/gid 0, mtime 0 and a sequential inode number, and entries are written
in sorted path order with parents first, so the same tree gives the same bytes on any host
and at any time. Device nodes can be described without root (the kernel creates them).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One archive member. `data` is file contents or, for a symlink, the link target."""

    path: PurePosixPath
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(path: str, perm: int = 0o755) -> Entry:
    """A directory entry."""
    return Entry(PurePosixPath(path), stat.S_IFDIR | perm)


def symlink(path: str, target: str) -> Entry:
    """A symbolic link entry pointing at `target`."""
    return Entry(PurePosixPath(path), stat.S_IFLNK | 0o777, target.encode())


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    """A regular file entry."""
    return Entry(PurePosixPath(path), stat.S_IFREG | perm, data)


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    """A character device node (created by the kernel when it unpacks the archive)."""
    return Entry(PurePosixPath(path), stat.S_IFCHR | perm, b"", major, minor)


def tree_entries(root: Path) -> Iterator[Entry]:
    """Describe every directory, regular file and symlink below `root` (not `root` itself).

    Permissions are kept (executable bits matter); ownership and times are not.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            full = Path(dirpath, name)
            rel = PurePosixPath(full.relative_to(root).as_posix())
            info = full.lstat()
            perm = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                yield Entry(rel, stat.S_IFLNK | 0o777, os.readlink(full).encode())
            elif stat.S_ISDIR(info.st_mode):
                yield Entry(rel, stat.S_IFDIR | perm)
            elif stat.S_ISREG(info.st_mode):
                yield Entry(rel, stat.S_IFREG | perm, full.read_bytes())
            else:
                raise ValueError(f"{full}: only directories, files and symlinks can be packed")


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(entry_name: str, ino: int, entry: Entry) -> bytes:
    name = entry_name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check
    )
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    return header + name + _pad(len(header) + len(name))


def write_archive(out: BinaryIO, entries: Iterable[Entry]) -> None:
    """Write `entries` as a newc archive, sorted by path, each path at most once.

    Raises ValueError on a duplicate path, or when a path is absolute or contains `..`
    (the archive must not name anything outside its own root).
    """
    by_path: dict[PurePosixPath, Entry] = {}
    for entry in entries:
        if entry.path.is_absolute() or ".." in entry.path.parts or not entry.path.parts:
            raise ValueError(f"cpio path {str(entry.path)!r} must be relative, without '..'")
        if entry.path in by_path:
            raise ValueError(f"cpio path {str(entry.path)!r} appears twice")
        by_path[entry.path] = entry
    # Sorting by parts puts every directory before its contents.
    for ino, path in enumerate(sorted(by_path, key=lambda p: p.parts), start=1):
        entry = by_path[path]
        out.write(_header(path.as_posix(), ino, entry))
        out.write(entry.data + _pad(len(entry.data)))
    out.write(_header(_TRAILER, 0, Entry(PurePosixPath(_TRAILER), 0)))
