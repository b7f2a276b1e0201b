"""The digest that names a snapshot's base image: holes are never read, zeros count the
same whether they are holes or written, and older manifests' plain sha256 still works."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kelpie.backends.qemu._snapshot import file_digest, find_base_image
from kelpie.vm import SnapshotIncompatible

MIB = 1 << 20


def sparse_sha256(data: bytes) -> str:
    """The definition, over every byte (kelpie.backends.qemu._snapshot.SPARSE)."""
    digest = hashlib.sha256(f"size {len(data)}\n".encode())
    for index in range(0, len(data), MIB):
        chunk = data[index:index + MIB]
        if chunk.strip(b"\0"):
            digest.update((index // MIB).to_bytes(8, "big") + chunk)
    return f"sparse-sha256:{digest.hexdigest()}"


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KELPIE_STATE_DIR", str(tmp_path / "state"))  # the digest cache


def test_sparse_and_written_zeros_digest_alike(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.img"
    with sparse.open("wb") as f:
        f.truncate(64 * MIB)
        f.seek(3 * MIB + 5)
        f.write(b"data")
        f.seek(40 * MIB)
        f.write(os.urandom(MIB + 7))
    dense = tmp_path / "dense.img"
    dense.write_bytes(sparse.read_bytes())  # every zero written
    assert dense.stat().st_blocks > sparse.stat().st_blocks
    assert file_digest(sparse) == file_digest(dense) == sparse_sha256(sparse.read_bytes())
    other = tmp_path / "other.img"
    other.write_bytes(sparse.read_bytes()[:-1] + b"\1")
    assert file_digest(other) != file_digest(sparse)
    with open(sparse, "r+b") as f:
        f.truncate(65 * MIB)  # more zeros at the end: another disk
    assert file_digest(sparse) != file_digest(dense)


def test_a_manifest_with_a_plain_sha256_still_finds_its_base(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"root" * 1000)
    legacy = f"sha256:{hashlib.sha256(base.read_bytes()).hexdigest()}"
    assert find_base_image(legacy, [tmp_path / "gone.img", base]) == base
    assert find_base_image(file_digest(base), [base]) == base
    with pytest.raises(SnapshotIncompatible, match=r"gone\.img does not exist"):
        find_base_image("sparse-sha256:" + "0" * 64, [tmp_path / "gone.img", base])
