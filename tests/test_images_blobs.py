"""BlobStore: verified, atomic, content-addressed storage; digests never become odd paths."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kelpie import StorageError
from kelpie.images import (
    BlobNotFound,
    BlobStore,
    DigestMismatch,
    InvalidDigest,
    sha256_digest,
    validate_digest,
)

DATA = b"hello, blob\n"
DIGEST = sha256_digest(DATA)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_bytes_then_read_back(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    path = store.put(DATA, DIGEST, size=len(DATA))
    assert path == tmp_path / "blobs" / "sha256" / DIGEST.removeprefix("sha256:")
    assert store.has(DIGEST)
    assert store.read_bytes(DIGEST) == DATA
    assert path.stat().st_mode & 0o777 == 0o444
    assert files_under(tmp_path) == [f"blobs/sha256/{DIGEST.removeprefix('sha256:')}"]


def test_put_stream_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    store = BlobStore(tmp_path)
    store.put(io.BytesIO(data), sha256_digest(data))
    with store.open(sha256_digest(data)) as reader:
        assert reader.read() == data


def test_wrong_content_is_not_stored(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(DigestMismatch, match="hashes to") as info:
        store.put(b"evil", DIGEST)
    assert info.value.expected == DIGEST
    assert info.value.actual == sha256_digest(b"evil")
    assert not store.has(DIGEST)
    assert files_under(tmp_path) == []  # the temp file is gone too


def test_wrong_size_is_not_stored(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(DigestMismatch, match="declared 5"):
        store.put(DATA, DIGEST, size=5)
    with pytest.raises(DigestMismatch, match="size is 12 bytes, declared 20"):
        store.put(DATA, DIGEST, size=20)
    assert files_under(tmp_path) == []


class EndlessStream(io.RawIOBase):
    """A stream that never ends: put() must stop reading once past the declared size."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        buffer[:] = b"x" * len(buffer)
        return len(buffer)


def test_oversized_stream_is_cut_off(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(DigestMismatch, match="more than the declared 100 bytes"):
        store.put(EndlessStream(), DIGEST, size=100)  # type: ignore[arg-type]


def test_corruption_on_disk_is_detected_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    path = store.put(DATA, DIGEST)
    path.chmod(0o644)
    path.write_bytes(b"tampered\n")
    with pytest.raises(DigestMismatch, match="stored blob"):
        store.read_bytes(DIGEST)
    with pytest.raises(DigestMismatch):
        store.verify(DIGEST)


def test_put_is_idempotent_and_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put(DATA, DIGEST)
    store.put(DATA, DIGEST)
    assert store.delete(DIGEST) is True
    assert store.delete(DIGEST) is False
    assert not store.has(DIGEST)
    with pytest.raises(BlobNotFound, match=DIGEST):
        store.open(DIGEST)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../../etc/passwd",
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 64 + "/",
        "sha256:" + "a" * 64 + "\n",
        "../sha256:" + "a" * 64,
        "sha512:" + "a" * 128,
        "a" * 64,
        "",
    ],
)
def test_bad_digests_never_become_paths(tmp_path: Path, digest: str) -> None:
    store = BlobStore(tmp_path)
    for call in (store.has, store.delete, store.open, store.path, lambda d: store.put(DATA, d)):
        with pytest.raises(InvalidDigest):
            call(digest)
    assert files_under(tmp_path) == []


@given(st.text(max_size=80))
def test_only_canonical_sha256_digests_validate(text: str) -> None:
    try:
        validate_digest(text)
    except InvalidDigest as exc:
        assert "sha256:" in str(exc)
        return
    assert text.startswith("sha256:")
    assert len(text) == 71
    assert set(text[7:]) <= set("0123456789abcdef")


def test_unwritable_root_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        BlobStore(blocker).put(DATA, DIGEST)
