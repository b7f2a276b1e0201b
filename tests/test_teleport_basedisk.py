"""A base disk on the wire: packed small, unpacked sparse, checked, never following a
backing file named by what arrived."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kelpie._exceptions import StorageError
from kelpie._fsutil import sparse_digest
from kelpie.teleport._basedisk import pack, unpack

MIB = 1 << 20


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.ext4"
    with path.open("wb") as f:
        f.truncate(2048 * MIB)  # a 2 GiB disk holding 3 MiB
        f.seek(100 * MIB)
        f.write(os.urandom(3 * MIB))
    return path


def test_a_sparse_disk_travels_small_and_lands_sparse(base: Path, tmp_path: Path) -> None:
    packed = tmp_path / "base.qcow2"
    pack(base, packed)
    assert packed.stat().st_size < 8 * MIB
    landed = tmp_path / "landed.ext4"
    unpack(packed, landed, sparse_digest(base))
    assert landed.stat().st_size == base.stat().st_size
    assert landed.stat().st_blocks * 512 < 8 * MIB
    assert sparse_digest(landed) == sparse_digest(base)
    assert landed.read_bytes()[100 * MIB:103 * MIB] == base.read_bytes()[100 * MIB:103 * MIB]


def test_a_damaged_or_other_disk_is_refused(base: Path, tmp_path: Path) -> None:
    packed = tmp_path / "base.qcow2"
    pack(base, packed)
    landed = tmp_path / "landed.ext4"
    with pytest.raises(StorageError, match="damaged on the way"):
        unpack(packed, landed, "sparse-sha256:" + "0" * 64)
    assert not landed.exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_a_backing_file_named_by_the_sender_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"host secret" * 1000)
    hostile = tmp_path / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret),
                    str(hostile)], check=True)
    landed = tmp_path / "landed.ext4"
    with pytest.raises(StorageError, match="damaged on the way"):  # zeros, not the secret
        unpack(hostile, landed, sparse_digest(secret))
    assert not landed.exists()
