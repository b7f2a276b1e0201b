"""A build step's layer, made in the guest: what changed in the root file system since
the last mark, as an OCI layer tar (PAX headers; whiteouts for what is gone) streamed to
the host, which treats it as untrusted like any layer.

``mark`` records every entry's identity (type, mode, owner, size, times, inode, link
target); ``layer`` walks again, streams the entries that are new or whose identity moved
(the kernel stamps ``ctime`` on every write, chmod or rename, and no program sets it
back), whiteouts for the topmost paths that are gone, and moves the mark to now. Other
mounted file systems (``/proc``, ``/tmp``) and the files the runtime writes into every
guest are left out. Hard links within the layer stay hard links.
"""

from __future__ import annotations

import os
import stat

from ._common import OpError
from ._walk import walk_tree

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Generator, Iterator
    from tarfile import TarInfo
    from typing import Any, Final

    from ._rootfs import RootFS

#: Written by the runtime into every guest: never part of a layer (Docker leaves them out).
EXCLUDED: Final = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
#: Bytes read from a file per chunk of the stream.
CHUNK: Final = 64 * 1024
BLOCK: Final = 512
"""A tar block (tarfile is imported only when a layer is made: the agent starts lighter)."""

Identity = tuple[str, int, int, int, int, int, int, int, str]


class Marks:
    """The mark a ``layer`` compares with (one per agent: a build runs its steps in order)."""

    def __init__(self, rootfs: RootFS) -> None:
        self.rootfs = rootfs
        self.serial = 0
        self.state: dict[str, Identity] | None = None

    def op_mark(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Record the file system as it is now."""
        self.state = self._snapshot()
        self.serial += 1
        return {"mark": self.serial, "entries": len(self.state)}

    def open_layer(self, mark: int) -> LayerStream:
        """The changes since ``mark`` as a tar stream; the mark moves to now."""
        if self.state is None or mark != self.serial:
            raise OpError("ESTALE", f"mark {mark} is not the agent's last mark "
                                    f"({self.serial}): take a new one")
        before, now = self.state, self._snapshot()
        self.state = now
        self.serial += 1
        changed = sorted(p for p, identity in now.items() if before.get(p) != identity)
        gone = {p for p in before if p not in now}
        deleted = sorted(p for p in gone if os.path.dirname(p) not in gone)
        return LayerStream(self.rootfs.root, deleted, changed, self.serial)

    def _snapshot(self) -> dict[str, Identity]:
        state: dict[str, Identity] = {}
        for path, host, st, mount in walk_tree(self.rootfs, "/"):
            if mount or path in EXCLUDED:
                continue
            target = os.readlink(host) if stat.S_ISLNK(st.st_mode) else ""
            state[path] = (_kind(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_size,
                           st.st_mtime_ns, st.st_ctime_ns, st.st_ino, target)
        return state


class LayerStream:
    """The tar of one layer, produced as the host reads it (bounded memory)."""

    def __init__(self, root: str, deleted: list[str], changed: list[str], mark: int) -> None:
        self.mark = mark
        self.entries = len(deleted) + len(changed)
        self._chunks = _tar(root, deleted, changed)
        self._buffer = bytearray()

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the stream; b"" at its end."""
        while len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def close(self) -> None:
        self._chunks.close()


def _tar(root: str, deleted: list[str], changed: list[str]) -> Generator[bytes, None, None]:
    import tarfile

    for path in deleted:
        parent, name = os.path.split(path)
        yield _header(tarfile.TarInfo(os.path.join(parent, ".wh." + name).lstrip("/")))
    linked: dict[tuple[int, int], str] = {}
    for path in changed:
        host = os.path.join(root, path.lstrip("/"))
        try:
            st = os.lstat(host)
        except OSError:
            continue  # gone since the walk
        info = tarfile.TarInfo(path.lstrip("/"))
        info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        info.mtime = st.st_mtime
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(host)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISREG(st.st_mode):
            first = linked.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if first is not None:
                info.type, info.linkname = tarfile.LNKTYPE, first
            else:
                if st.st_nlink > 1:
                    linked[(st.st_dev, st.st_ino)] = info.name
                info.size = st.st_size
                yield _header(info)
                yield from _content(host, st.st_size)
                continue
        else:
            continue  # sockets: nothing an image holds
        yield _header(info)
    yield b"\0" * (2 * BLOCK)


def _header(info: TarInfo) -> bytes:
    import tarfile

    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _content(path: str, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes of the file (zeros if it shrank meanwhile), then padding."""
    left = size
    try:
        with open(path, "rb") as data:
            while left:
                chunk = data.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
    except OSError:
        pass
    while left:
        pad = min(CHUNK, left)
        left -= pad
        yield b"\0" * pad
    if size % BLOCK:
        yield b"\0" * (BLOCK - size % BLOCK)


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "link" if stat.S_ISLNK(mode) else "other"
