"""Storage: the injectable file store that snapshots and the runtime's directories go through.

Production code uses :class:`LocalStorage` (the host file system, atomic writes with fsync).
The deterministic simulator hands in an in-memory store with injected faults and crashes
(``kelpie.sim.SimStorage``) instead, so the same snapshot and runtime code runs under both.
Every change to the store is one call here: that is what lets the simulator crash the host
between any two of them.
"""

from __future__ import annotations

import abc
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from kelpie._exceptions import StorageError
from kelpie._fsutil import fsync_dir, write_atomic

CHUNK_SIZE = 1024 * 1024


class Storage(abc.ABC):
    """A small file store: whole-file atomic writes, streamed reads, directories, renames."""

    @abc.abstractmethod
    def write_bytes(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically: after a crash it is old or new, never torn."""

    @abc.abstractmethod
    def read_bytes(self, path: Path) -> bytes:
        """Read a whole file; :class:`StorageError` if it is missing or unreadable."""

    @abc.abstractmethod
    def open_read(self, path: Path) -> BinaryIO:
        """Open a file for streamed reading (for hashing large blobs)."""

    @abc.abstractmethod
    def size(self, path: Path) -> int:
        """Size of a file in bytes."""

    @abc.abstractmethod
    def exists(self, path: Path) -> bool:
        """Whether a file or directory exists at ``path``."""

    @abc.abstractmethod
    def mkdir(self, path: Path) -> None:
        """Create a directory and its parents (no error if it exists)."""

    @abc.abstractmethod
    def list_dir(self, path: Path) -> list[str]:
        """Sorted names in a directory (empty if it does not exist)."""

    @abc.abstractmethod
    def rename(self, src: Path, dst: Path) -> None:
        """Atomically rename a file or directory; ``dst`` must not exist."""

    @abc.abstractmethod
    def remove_tree(self, path: Path) -> None:
        """Remove a file or directory tree; no error if it does not exist."""

    @abc.abstractmethod
    def is_dir(self, path: Path) -> bool:
        """Whether ``path`` is a directory."""

    @abc.abstractmethod
    def open_write(self, path: Path) -> BinaryIO:
        """Create a new file (it must not exist) for streamed writing. Not atomic: write
        inside a partial directory that is renamed into place when complete."""

    @abc.abstractmethod
    def open_append(self, path: Path) -> BinaryIO:
        """Open a file for appending (created if missing; e.g. a log), unbuffered."""


class LocalStorage(Storage):
    """The host file system. Writes go to a temporary file, are fsynced, then renamed."""

    def write_bytes(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def read_bytes(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def open_read(self, path: Path) -> BinaryIO:
        try:
            return path.open("rb")
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def size(self, path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot stat {path}: {exc.strerror or exc}") from exc

    def exists(self, path: Path) -> bool:
        return path.exists()

    def mkdir(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from exc

    def list_dir(self, path: Path) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {path}: {exc.strerror or exc}") from exc

    def rename(self, src: Path, dst: Path) -> None:
        if dst.exists():
            raise StorageError(f"cannot rename {src} to {dst}: destination exists")
        try:
            os.rename(src, dst)
            fsync_dir(dst.parent)
        except OSError as exc:
            raise StorageError(f"cannot rename {src} to {dst}: {exc.strerror or exc}") from exc

    def remove_tree(self, path: Path) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot remove {path}: {exc.strerror or exc}") from exc

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def open_write(self, path: Path) -> BinaryIO:
        try:
            return path.open("xb")
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from exc

    def open_append(self, path: Path) -> BinaryIO:
        try:
            return path.open("ab", buffering=0)
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
