"""A content-addressed blob store: ``<root>/blobs/sha256/<hex>``, written atomically.

A blob is written to a temporary file in ``<root>/tmp`` (same filesystem), hashed while it
is written, checked against the expected digest and size, flushed to disk and only then
renamed into place: a reader never sees a partial or unverified blob. Reads verify again,
because the disk is not trusted either.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from kelpie._exceptions import StorageError
from kelpie._fsutil import fsync_dir
from kelpie.images._digest import validate_digest
from kelpie.images._errors import BlobNotFound, DigestMismatch

CHUNK_SIZE = 1 << 20
"""Bytes read or written per step when streaming a blob."""


class VerifiedReader(io.RawIOBase):
    """A read-only stream of a stored blob that checks its digest when it reaches the end.

    Reading to EOF raises :class:`DigestMismatch` (instead of returning the final empty read)
    if the content or size is wrong. A caller that stops early must not trust what it read;
    use :meth:`BlobStore.verify` first or :meth:`BlobStore.read_bytes` for small blobs.
    """

    def __init__(self, file: BinaryIO, digest: str, size: int) -> None:
        super().__init__()
        self._file = file
        self._digest = digest
        self._expected_size = size
        self._hash = hashlib.sha256()
        self._read = 0
        self._checked = False

    def readable(self) -> bool:
        """Always true."""
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        """Read into ``buffer``; at EOF, verify the digest before returning 0."""
        data = self._file.read(len(buffer))
        if data:
            self._hash.update(data)
            self._read += len(data)
            buffer[: len(data)] = data
            return len(data)
        self._check()
        return 0

    def _check(self) -> None:
        if self._checked:
            return
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest or self._read != self._expected_size:
            raise DigestMismatch(
                self._digest,
                actual,
                expected_size=self._expected_size,
                actual_size=self._read,
                what="stored blob",
            )
        self._checked = True

    def close(self) -> None:
        """Close the underlying file."""
        self._file.close()
        super().close()


class BlobStore:
    """Content-addressed, verified storage of blobs under ``root``.

    Every digest is validated (``sha256:`` + 64 lowercase hex) before it becomes a path.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists)."""
        return self._blobs / validate_digest(digest).removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        """Whether the blob is stored (not whether its content is intact: see :meth:`verify`)."""
        return self.path(digest).is_file()

    def put(
        self, data: bytes | BinaryIO, expected_digest: str, *, size: int | None = None
    ) -> Path:
        """Store ``data`` (bytes or a binary stream) as ``expected_digest``; return its path.

        Raises :class:`DigestMismatch` (storing nothing) if the content does not hash to
        ``expected_digest`` or its length differs from ``size``. A stream is read only up to
        ``size + 1`` bytes when the size is known. A blob already stored is not read again.
        """
        target = self.path(expected_digest)
        if target.is_file():
            return target
        stream: BinaryIO = io.BytesIO(data) if isinstance(data, bytes) else data
        try:
            self._mkdirs()
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="blob-")
        except OSError as exc:
            raise StorageError(f"cannot write blobs under {self.root}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as out:
                actual, written = _copy_hashing(stream, out, size)
                out.flush()
                os.fsync(out.fileno())
            _check_content(expected_digest, actual, size, written)
            os.chmod(tmp_name, 0o444)
            os.replace(tmp_name, target)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot store blob {expected_digest}: {exc}") from exc
            raise
        fsync_dir(self._blobs)
        return target

    def open(self, digest: str) -> VerifiedReader:
        """Open a stored blob for reading; the digest is checked when the reader hits EOF."""
        path = self.path(digest)
        try:
            file = path.open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(digest, str(self.root)) from exc
        except OSError as exc:
            raise StorageError(f"cannot open blob {digest} in {self.root}: {exc}") from exc
        return VerifiedReader(file, digest, os.fstat(file.fileno()).st_size)

    def read_bytes(self, digest: str) -> bytes:
        """The whole content of a stored blob, verified (for small blobs: manifests, configs)."""
        with self.open(digest) as reader:
            return reader.read()

    def verify(self, digest: str) -> None:
        """Read the stored blob through and raise :class:`DigestMismatch` if it is corrupt."""
        with self.open(digest) as reader:
            while reader.read(CHUNK_SIZE):
                pass

    def delete(self, digest: str) -> bool:
        """Remove a stored blob; return whether it existed."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def _mkdirs(self) -> None:
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)


def _copy_hashing(stream: BinaryIO, out: BinaryIO, size: int | None) -> tuple[str | None, int]:
    """Copy ``stream`` to ``out``; return (digest, bytes), digest None if over ``size``."""
    hasher = hashlib.sha256()
    written = 0
    while True:
        want = CHUNK_SIZE if size is None else min(CHUNK_SIZE, size + 1 - written)
        chunk = stream.read(want) if want > 0 else b""
        if not chunk:
            break
        hasher.update(chunk)
        out.write(chunk)
        written += len(chunk)
        if size is not None and written > size:
            return None, written
    return "sha256:" + hasher.hexdigest(), written


def _check_content(expected: str, actual: str | None, size: int | None, written: int) -> None:
    if actual is None or actual != expected or (size is not None and written != size):
        raise DigestMismatch(expected, actual, expected_size=size, actual_size=written)
