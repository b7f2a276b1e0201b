"""A rootfs directory that layer entries can only change from the inside.

Every path is resolved one component at a time with ``*at`` system calls relative to an
open directory descriptor, never by handing a joined path to the kernel:

- a symlink met in a *parent* component is followed as if the rootfs were ``/`` (an absolute
  target restarts at the rootfs, ``..`` stops at the rootfs), the way a container sees it;
- the *final* component is never followed: an existing file, symlink or directory there is
  replaced, and new files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW``;
- names containing ``..`` are refused before any of this (callers check, see
  :func:`entry_parts`).

So no entry can write, link or delete outside the rootfs, whatever symlinks earlier entries
or layers left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from kelpie.images._errors import LayerError, UnsafeLayer

MAX_SYMLINK_HOPS = 40
"""Symlinks followed while resolving one path before it is refused (as the kernel's ELOOP)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

RelPath = tuple[str, ...]


def entry_parts(name: str, entry: str) -> RelPath:
    """Split a tar entry name (or hard link target) into rootfs-relative components.

    A leading ``/`` or ``./`` is dropped (the name is relative to the rootfs either way);
    any ``..`` component is refused with :class:`UnsafeLayer`.
    """
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayer(entry, f"path {name!r} contains '..'")
    return parts


class Rootfs:
    """An open rootfs directory with confined resolution and whiteout-aware removal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Paths this layer wrote, and every ancestor of one: whiteouts spare these.
        self.written: set[RelPath] = set()
        self.ancestors: set[RelPath] = set()

    def close(self) -> None:
        """Close the rootfs descriptor."""
        os.close(self.fd)

    def mark_written(self, path: RelPath) -> None:
        """Record that this layer produced ``path`` (so its own whiteouts spare it)."""
        self.written.add(path)
        for i in range(len(path)):
            self.ancestors.add(path[:i])

    @contextlib.contextmanager
    def directory(self, parts: RelPath, entry: str, *, create: bool) -> Iterator[Dir | None]:
        """Resolve ``parts`` as a directory inside the rootfs and yield it open.

        Missing components are created (mode 0755) when ``create`` is true; otherwise the
        result is None. A non-directory in the way is refused with :class:`LayerError`.
        """
        resolved = self._resolve(parts, entry, create=create)
        try:
            yield resolved
        finally:
            if resolved is not None and resolved.fd != self.fd:
                os.close(resolved.fd)

    def _resolve(self, parts: RelPath, entry: str, *, create: bool) -> Dir | None:
        stack: list[Dir] = [Dir(self.fd, ())]
        pending = list(reversed(parts))
        hops = 0
        try:
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(stack) > 1:
                        os.close(stack.pop().fd)
                    continue
                top = stack[-1]
                st = _lstat(name, top.fd)
                if st is None:
                    if not create:
                        return None
                    os.mkdir(name, 0o755, dir_fd=top.fd)
                    st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise UnsafeLayer(entry, f"more than {MAX_SYMLINK_HOPS} symlinks in path")
                    target = os.readlink(name, dir_fd=top.fd)
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop().fd)
                    pending.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    where = "/".join((*top.path, name))
                    raise LayerError(f"layer entry {entry!r}: parent {where!r} is not a directory")
                stack.append(Dir(os.open(name, _DIR_FLAGS, dir_fd=top.fd), (*top.path, name)))
        except BaseException:
            for d in stack[1:]:
                os.close(d.fd)
            raise
        for d in stack[1:-1]:
            os.close(d.fd)
        return stack[-1]

    def clear(self, parent: Dir, name: str, *, keep_dir: bool) -> bool:
        """Remove whatever is at ``parent/name`` without following it.

        A directory is kept (and True returned) when ``keep_dir`` is true, so a directory
        entry over an existing directory merges with it.
        """
        st = _lstat(name, parent.fd)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(name, dir_fd=parent.fd)
        else:
            os.unlink(name, dir_fd=parent.fd)
        return False

    def remove_lower(self, parent: Dir, name: str) -> None:
        """Apply a whiteout: remove ``parent/name`` as far as it came from lower layers.

        What this layer wrote survives; a directory this layer wrote into is kept and its
        lower-layer children removed (the upper directory hides the lower one).
        """
        path = (*parent.path, name)
        st = _lstat(name, parent.fd)
        if st is None:
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir and path in self.written:
            return
        if is_dir and (path in self.written or path in self.ancestors):
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
            try:
                self.remove_lower_children(Dir(fd, path))
            finally:
                os.close(fd)
            return
        self.clear(parent, name, keep_dir=False)

    def remove_lower_children(self, directory: Dir) -> None:
        """Apply an opaque whiteout: remove every lower-layer child of ``directory``."""
        for child in sorted(os.listdir(directory.fd)):
            self.remove_lower(directory, child)


class Dir:
    """An open directory inside the rootfs and its resolved rootfs-relative path."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: RelPath) -> None:
        self.fd = fd
        self.path = path


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
