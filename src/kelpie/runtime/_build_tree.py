"""What a build knows of a stage's file system between steps: every path's type, mode,
owner and link target (no contents), kept so that ``WORKDIR`` and ``COPY`` create only
the directories that are missing and write through the image's symbolic links (``/bin``
-> ``usr/bin``) the way Docker does, without booting a VM or unpacking a layer.

It starts from the base image's root directory or a guest's ``walk``, and follows each
layer the build adds (its tar listing: entries and whiteouts).
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterable, Mapping
from typing import IO

from kelpie.vm import TreeEntry

MAX_LINKS = 40
"""Symbolic links followed in one path before it counts as a loop (Linux's limit)."""
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class FsTree:
    """A stage's file system as path -> :class:`TreeEntry` (see the module docstring)."""

    def __init__(self, entries: Iterable[TreeEntry] = ()) -> None:
        self._entries: dict[str, TreeEntry] = {e.path: e for e in entries if not e.mount}

    def __contains__(self, path: str) -> bool:
        return path in self._entries

    def get(self, path: str) -> TreeEntry | None:
        return self._entries.get(path)

    def entries(self) -> Mapping[str, TreeEntry]:
        return self._entries

    def resolve(self, path: str, *, follow_last: bool = True) -> str:
        """``path`` (absolute) with every symbolic link in it followed inside this tree,
        as the guest's kernel would (``..`` stops at ``/``). Components that do not exist
        are kept as they are; a loop leaves the path as given (the layer check refuses
        what it makes)."""
        def target(candidate: str) -> str | None:
            entry = self._entries.get(candidate)
            return entry.target if entry is not None and entry.type == "symlink" else None

        return follow_links(path, target, follow_last=follow_last) or posixpath.normpath(path)

    def is_dir(self, path: str) -> bool:
        entry = self._entries.get(self.resolve(path))
        return entry is not None and entry.type == "dir"

    def missing_dirs(self, path: str) -> list[str]:
        """The directories (``path`` itself and its parents, resolved) that do not exist
        yet, top first."""
        missing = []
        current = self.resolve(path)
        while current != "/" and current not in self._entries:
            missing.append(current)
            current = posixpath.dirname(current)
        return missing[::-1]

    def set(self, entry: TreeEntry) -> None:
        self.remove(entry.path, keep_dir=entry.type == "dir")
        self._entries[entry.path] = entry

    def remove(self, path: str, *, keep_dir: bool = False) -> None:
        """Remove ``path`` and (unless it is a directory replaced by one) what is below."""
        old = self._entries.get(path)
        if old is not None and old.type == "dir" and keep_dir:
            return
        self._entries.pop(path, None)
        prefix = path.rstrip("/") + "/"
        for below in [p for p in self._entries if p.startswith(prefix)]:
            del self._entries[below]

    def apply_tar(self, layer: IO[bytes]) -> None:
        """Follow one layer (a tar stream, any compression tarfile detects): its entries
        replace paths, its whiteouts remove them. Names are normalised; the listing is only
        a model (the layer itself is checked when a root file system is made of it)."""
        with tarfile.open(fileobj=layer, mode="r|*") as tar:
            for member in tar:
                path = posixpath.normpath("/" + member.name)
                parent, name = posixpath.split(path)
                if name == OPAQUE:
                    self.remove(parent, keep_dir=True)
                    for below in [p for p in self._entries if p.startswith(parent + "/")]:
                        del self._entries[below]
                elif name.startswith(WHITEOUT):
                    self.remove(posixpath.join(parent, name[len(WHITEOUT):]))
                else:
                    self.set(member_entry(path, member))


def follow_links(path: str, link_target: Callable[[str], str | None], *,
                 follow_last: bool = True) -> str | None:
    """``path`` (absolute) with its symbolic links followed, ``link_target(p)`` giving the
    target of the link at ``p`` (None: not a link); ``..`` stops at ``/`` and absolute
    targets start again there, so the result never leaves the root. None on a loop."""
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/" + "/".join([*resolved, part])
        target = link_target(candidate) if parts or follow_last else None
        if target is None:
            resolved.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            return None
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p and p != "."] + parts
    return "/" + "/".join(resolved)


def member_entry(path: str, member: tarfile.TarInfo) -> TreeEntry:
    """The tree entry a tar member makes at ``path``."""
    if member.isdir():
        kind = "dir"
    elif member.issym():
        kind = "symlink"
    elif member.isfifo():
        kind = "fifo"
    elif member.ischr():
        kind = "char"
    elif member.isblk():
        kind = "block"
    else:
        kind = "file"  # regular files and hard links
    mtime_ns = int(member.mtime) * 1_000_000_000
    return TreeEntry(path, kind, member.mode & 0o7777, member.uid, member.gid, member.size,
                     mtime_ns, mtime_ns, target=member.linkname if kind == "symlink" else None)

