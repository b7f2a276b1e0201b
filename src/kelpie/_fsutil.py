"""File helpers shared by every layer: durable writes (temp file, fsync, rename, fsync dir)
and an exclusive lock file."""

from __future__ import annotations

import contextlib
import fcntl
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
