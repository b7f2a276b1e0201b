"""File helpers shared by every layer: durable writes (temp file, fsync, rename, fsync dir)
and an exclusive lock file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block, waiting
    for any other process (or thread) that holds it."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: after a crash it holds the old or the new bytes.

    Creates the parent directory if needed. Raises ``OSError``; callers translate it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def copy_sparse(source: Path, target: Path) -> None:
    """Copy ``source`` to the new file ``target``, holes kept and blocks shared where the
    filesystem can (reflink), then fsync it. Raises ``OSError`` saying why it failed."""
    done = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(source), str(target)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise OSError(f"cannot copy {source} to {target}: {done.stderr.strip()}")
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SPARSE = "sparse-sha256"
"""A disk image's digest: sha256 over its size and each 1 MiB chunk that is not all zeros
(with its index). Holes are never read: a 10 GiB disk with 60 MiB of files hashes in
milliseconds, and copies that differ only in which zeros are holes get the same digest."""

_SPARSE_CHUNK = 1 << 20


def sparse_digest(path: Path) -> str:
    """``sparse-sha256:<hex>`` of the file at ``path`` (see :data:`SPARSE`)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.sha256(f"size {size}\n".encode())
        zeros = bytes(_SPARSE_CHUNK)
        for index in _data_chunks(f.fileno(), size):
            f.seek(index * _SPARSE_CHUNK)
            chunk = f.read(_SPARSE_CHUNK)
            if chunk != zeros[:len(chunk)]:
                digest.update(index.to_bytes(8, "big") + chunk)
    return f"{SPARSE}:{digest.hexdigest()}"


def _data_chunks(fd: int, size: int) -> Iterator[int]:
    """Indexes of the chunks that hold data (all of them where holes cannot be found)."""
    last = -1
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            start, end = offset, size  # no hole support here: read it all
        for index in range(max(start // _SPARSE_CHUNK, last + 1),
                           (end - 1) // _SPARSE_CHUNK + 1):
            yield index
            last = index
        offset = end
