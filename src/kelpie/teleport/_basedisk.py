"""A sandbox's base disk on the wire: packed as qcow2, so that a 10 GiB disk holding 60 MiB
of files travels as about 60 MiB and lands sparse (``qemu-img convert`` skips holes both
ways). What arrives is unpacked with its backing file forbidden (a qcow2 that names one
would read that host file into the disk) and then must have the digest offered."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from kelpie._exceptions import StorageError
from kelpie._fsutil import sparse_digest

PACKED_NAME = "base-disk.qcow2"


def pack(base: Path, packed: Path) -> None:
    """Write the raw disk image ``base`` to ``packed`` as qcow2 (data only)."""
    _qemu_img("packing", "convert", "-q", "-f", "raw", "-O", "qcow2", str(base), str(packed))


def unpack(packed: Path, target: Path, digest: str) -> None:
    """Make ``target`` the raw, sparse disk that ``packed`` holds, if its digest is
    ``digest``; else StorageError, and no ``target``."""
    source = json.dumps({"driver": "qcow2", "backing": None,
                         "file": {"driver": "file", "filename": str(packed)}})
    partial = target.with_name(f".{target.name}.partial")
    try:
        _qemu_img("unpacking", "convert", "-q", "-O", "raw", f"json:{source}", str(partial))
        actual = sparse_digest(partial)
        if actual != digest:
            raise StorageError(f"the base disk received is {actual}, the source offered "
                               f"{digest}: it was damaged on the way; teleport again")
        os.chmod(partial, 0o444)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _qemu_img(what: str, *args: str) -> None:
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                              check=False, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StorageError(f"{what} the base disk with qemu-img failed: {exc}") from exc
    if done.returncode != 0:
        raise StorageError(f"{what} the base disk with qemu-img failed: "
                           f"{done.stderr.strip() or done.returncode}")
