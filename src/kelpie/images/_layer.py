"""Applying one OCI layer (a tar changeset, maybe compressed) onto a rootfs directory.

This is a security boundary: layers come from untrusted images. Paths are resolved inside
the rootfs only (see :mod:`kelpie.images._rootfs`); symlinks in the layer are created as
links and never followed when writing; whiteouts ``.wh.NAME`` and opaque markers
``.wh..wh..opq`` remove only what *lower* layers put there; the decompressed size and the
entry count are limited. If :func:`apply_layer` raises, the rootfs is partially applied and
must be discarded; nothing outside it was touched.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, BinaryIO, cast

from kelpie.images._errors import ImageError, LayerError, UnsafeLayer
from kelpie.images._rootfs import Dir, RelPath, Rootfs, entry_parts

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
"""A layer entry ``dir/.wh.NAME`` deletes ``dir/NAME`` of the layers below."""

OPAQUE_WHITEOUT = ".wh..wh..opq"
"""A layer entry ``dir/.wh..wh..opq`` hides every lower-layer child of ``dir``."""

_CHUNK = 1 << 20
_BLOCKED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


class Compression(Enum):
    """How a layer's tar stream is compressed."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


LAYER_MEDIA_TYPES: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}
"""Layer media types :func:`apply_layer` understands, and their compression."""


@dataclass(frozen=True, slots=True)
class LayerLimits:
    """Limits that turn a decompression bomb into :class:`UnsafeLayer`.

    ``max_bytes`` caps the file content written; ``max_entries`` the tar entries; the
    decompressed tar stream may be at most ``max_bytes + max_metadata_bytes`` long.
    """

    max_bytes: int = 16 << 30
    max_entries: int = 500_000
    max_metadata_bytes: int = 256 << 20


@dataclass(slots=True)
class LayerResult:
    """What :func:`apply_layer` did.

    ``diff_id`` is the sha256 of the uncompressed tar stream (compare it with the image
    config's ``rootfs.diff_ids``); ``skipped`` lists entries not applied, with the reason.
    """

    diff_id: str = ""
    entries: int = 0
    bytes_written: int = 0
    skipped: list[str] = field(default_factory=list)


def apply_layer(
    rootfs: Path,
    layer: BinaryIO | Path,
    *,
    media_type: str,
    limits: LayerLimits | None = None,
    strict: bool = True,
    preserve_owner: bool | None = None,
) -> LayerResult:
    """Apply one layer onto the directory ``rootfs`` (which must exist).

    ``strict`` refuses an unsafe entry (``..`` in a path, a hard link out of reach, ...)
    by raising :class:`UnsafeLayer`; otherwise the entry is skipped with a warning and
    listed in :attr:`LayerResult.skipped`. Size limits always raise. Ownership, device
    nodes and non-``user.`` xattrs are applied when ``preserve_owner`` is true (default:
    when running as root); device nodes are skipped with a warning otherwise.
    """
    compression = _compression_of(media_type)
    applier = _Applier(
        Rootfs(Path(rootfs)),
        limits or LayerLimits(),
        strict=strict,
        privileged=os.geteuid() == 0 if preserve_owner is None else preserve_owner,
    )
    try:
        with _opened(layer) as raw, _decompressed(raw, compression) as plain:
            stream = _CountingReader(plain, applier.limits)
            applier.apply_tar(stream)
            applier.finish()
            applier.result.diff_id = stream.digest()
    finally:
        applier.rootfs.close()
    return applier.result


def _compression_of(media_type: str) -> Compression:
    try:
        return LAYER_MEDIA_TYPES[media_type]
    except KeyError:
        known = ", ".join(sorted(LAYER_MEDIA_TYPES))
        raise LayerError(
            f"unsupported layer media type {media_type!r}; supported: {known}"
        ) from None


@contextlib.contextmanager
def _opened(layer: BinaryIO | Path) -> Iterator[BinaryIO]:
    if isinstance(layer, Path):
        with layer.open("rb") as file:
            yield file
    else:
        yield layer


@contextlib.contextmanager
def _decompressed(raw: BinaryIO, compression: Compression) -> Iterator[BinaryIO]:
    if compression is Compression.NONE:
        yield raw
    elif compression is Compression.GZIP:
        with gzip.GzipFile(fileobj=raw, mode="rb") as plain:
            yield cast(BinaryIO, plain)
    else:
        try:
            import zstandard
        except ImportError as exc:
            raise LayerError(
                "zstd-compressed layers need the 'zstandard' package: pip install zstandard"
            ) from exc
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        with reader as plain:
            yield plain


def _decoder_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


class _CountingReader(io.RawIOBase):
    """The decompressed tar stream: hashed (diff_id) and capped in length."""

    def __init__(self, inner: BinaryIO, limits: LayerLimits) -> None:
        super().__init__()
        self._inner = inner
        self._cap = limits.max_bytes + limits.max_metadata_bytes
        self._hash = hashlib.sha256()
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = min(len(buffer), self._cap + 1 - self.total)
        data = self._inner.read(max(want, 1))
        self.total += len(data)
        if self.total > self._cap:
            raise UnsafeLayer("", f"decompressed layer is larger than {self._cap} bytes")
        self._hash.update(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end, so the hash covers the whole stream (and trailers are checked)."""
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        """The sha256 digest of everything read so far."""
        return "sha256:" + self._hash.hexdigest()


class _Applier:
    """Applies the entries of one tar stream to a :class:`Rootfs`."""

    def __init__(
        self, rootfs: Rootfs, limits: LayerLimits, *, strict: bool, privileged: bool
    ) -> None:
        self.rootfs = rootfs
        self.limits = limits
        self.strict = strict
        self.privileged = privileged
        self.result = LayerResult()
        self._dir_meta: dict[RelPath, tarfile.TarInfo] = {}

    def apply_tar(self, stream: _CountingReader) -> None:
        """Apply every entry of the tar ``stream`` in order, then read it to its end."""
        buffered = io.BufferedReader(stream, _CHUNK)
        try:
            with tarfile.open(fileobj=buffered, mode="r|") as tar:
                for member in tar:
                    self._count_entry()
                    self._apply_member(tar, member)
            buffered.detach()  # keep ``stream`` open to drain it
            stream.drain()  # checks compression trailers; diff_id covers the whole stream
        except ImageError:
            raise
        except _decoder_errors() as exc:
            raise LayerError(f"layer is not a valid (compressed) tar stream: {exc}") from exc
        except OSError as exc:
            raise LayerError(f"cannot apply layer: {exc}") from exc

    def finish(self) -> None:
        """Set directory modes and times last (children changed them; 0555 blocks writes)."""
        for path in sorted(self._dir_meta, key=len, reverse=True):
            with self.rootfs.directory(path[:-1], "/".join(path), create=False) as parent:
                if parent is not None:
                    self._finish_dir(parent, path[-1] if path else None, self._dir_meta[path])

    def _count_entry(self) -> None:
        self.result.entries += 1
        if self.result.entries > self.limits.max_entries:
            raise UnsafeLayer("", f"layer has more than {self.limits.max_entries} entries")

    def _apply_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        try:
            parts = entry_parts(member.name, member.name)
            if parts and parts[-1].startswith(WHITEOUT_PREFIX):
                self._apply_whiteout(member.name, parts)
            else:
                self._apply_entry(tar, member, parts)
        except UnsafeLayer as exc:
            if self.strict or not exc.entry:
                raise
            self._skip(member.name, exc.reason)

    def _skip(self, entry: str, reason: str) -> None:
        log.warning("layer entry %r skipped: %s", entry, reason)
        self.result.skipped.append(f"{entry}: {reason}")

    def _apply_whiteout(self, entry: str, parts: RelPath) -> None:
        base = parts[-1]
        target = base.removeprefix(WHITEOUT_PREFIX)
        if base != OPAQUE_WHITEOUT and target in ("", ".", ".."):
            raise UnsafeLayer(entry, f"whiteout names no file ({target!r})")
        if base != OPAQUE_WHITEOUT and target.startswith(WHITEOUT_PREFIX):
            log.debug("ignoring reserved whiteout entry %r", entry)
            return
        with self.rootfs.directory(parts[:-1], entry, create=False) as parent:
            if parent is None:
                return  # nothing below to hide
            if base == OPAQUE_WHITEOUT:
                self.rootfs.remove_lower_children(parent)
            else:
                self.rootfs.remove_lower(parent, target)

    def _apply_entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: RelPath) -> None:
        if not parts:
            if member.isdir():
                self._dir_meta[()] = member
            return
        if member.islnk():
            self._apply_hardlink(member, parts)
            return
        writer = self._writer_for(member)
        if writer is None:
            return
        with self.rootfs.directory(parts[:-1], member.name, create=True) as parent:
            assert parent is not None
            kept_dir = self.rootfs.clear(parent, parts[-1], keep_dir=member.isdir())
            writer(tar, member, parent, parts[-1], kept_dir)
            self.rootfs.mark_written((*parent.path, parts[-1]))

    def _apply_hardlink(self, member: tarfile.TarInfo, parts: RelPath) -> None:
        target = entry_parts(member.linkname, member.name)
        if not target:
            raise UnsafeLayer(member.name, "hard link to the rootfs directory itself")
        with self.rootfs.directory(target[:-1], member.name, create=False) as tdir:
            st = None if tdir is None else _lstat(target[-1], tdir)
            if tdir is None or st is None:
                raise UnsafeLayer(member.name, f"hard link target {member.linkname!r} not found")
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeLayer(member.name, "hard link to a directory")
            with self.rootfs.directory(parts[:-1], member.name, create=True) as parent:
                assert parent is not None
                path = (*parent.path, parts[-1])
                if (*tdir.path, target[-1]) != path:  # a link to itself is already there
                    self.rootfs.clear(parent, parts[-1], keep_dir=False)
                    os.link(
                        target[-1],
                        parts[-1],
                        src_dir_fd=tdir.fd,
                        dst_dir_fd=parent.fd,
                        follow_symlinks=False,
                    )
                self.rootfs.mark_written(path)

    def _writer_for(self, member: tarfile.TarInfo) -> _Writer | None:
        if member.isreg():
            return self._write_file
        if member.isdir():
            return self._write_dir
        if member.issym():
            return self._write_symlink
        if member.isfifo() or member.ischr() or member.isblk():
            if member.isfifo() or self.privileged:
                return self._write_node
            self._skip(member.name, "device nodes are created only when running as root")
            return None
        self._skip(member.name, f"unsupported tar entry type {member.type!r}")
        return None

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent: Dir, name: str, _: bool
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent.fd)
        with os.fdopen(fd, "wb") as out:
            source = tar.extractfile(member)
            if source is not None:
                self._copy(source, out, member.name)
            self._set_owner(member, fd=fd)
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(member, fd)
            out.flush()
            os.utime(fd, ns=_times(member))

    def _copy(self, source: IO[bytes], out: BinaryIO, entry: str) -> None:
        while chunk := source.read(_CHUNK):
            self.result.bytes_written += len(chunk)
            if self.result.bytes_written > self.limits.max_bytes:
                raise UnsafeLayer("", f"layer writes more than {self.limits.max_bytes} bytes")
            out.write(chunk)

    def _write_dir(
        self, _: tarfile.TarFile, member: tarfile.TarInfo, parent: Dir, name: str, kept: bool
    ) -> None:
        if not kept:
            os.mkdir(name, 0o700, dir_fd=parent.fd)
        self._dir_meta[(*parent.path, name)] = member

    def _write_symlink(
        self, _: tarfile.TarFile, member: tarfile.TarInfo, parent: Dir, name: str, __: bool
    ) -> None:
        os.symlink(member.linkname, name, dir_fd=parent.fd)
        self._set_owner(member, parent=parent, name=name)
        os.utime(name, ns=_times(member), dir_fd=parent.fd, follow_symlinks=False)

    def _write_node(
        self, _: tarfile.TarFile, member: tarfile.TarInfo, parent: Dir, name: str, __: bool
    ) -> None:
        mode = member.mode & 0o7777
        if member.isfifo():
            os.mkfifo(name, mode, dir_fd=parent.fd)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(name, mode | kind, device, dir_fd=parent.fd)
        self._set_owner(member, parent=parent, name=name)
        os.chmod(name, mode, dir_fd=parent.fd)  # the new node, just created: not a symlink
        os.utime(name, ns=_times(member), dir_fd=parent.fd, follow_symlinks=False)

    def _finish_dir(self, parent: Dir, name: str | None, member: tarfile.TarInfo) -> None:
        if name is None:
            fd = os.dup(self.rootfs.fd)
        else:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent.fd)
            except OSError:
                return  # replaced by a later entry of this layer
        try:
            self._set_owner(member, fd=fd)
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(member, fd)
            os.utime(fd, ns=_times(member))
        finally:
            os.close(fd)

    def _set_owner(
        self,
        member: tarfile.TarInfo,
        *,
        fd: int | None = None,
        parent: Dir | None = None,
        name: str = "",
    ) -> None:
        if not self.privileged:
            return
        if fd is not None:
            os.fchown(fd, member.uid, member.gid)
        elif parent is not None:
            os.chown(name, member.uid, member.gid, dir_fd=parent.fd, follow_symlinks=False)

    def _set_xattrs(self, member: tarfile.TarInfo, fd: int) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key.removeprefix("SCHILY.xattr.")
            if attr.startswith(_BLOCKED_XATTR_PREFIXES):
                self._skip(member.name, f"xattr {attr!r} is reserved for overlayfs")
                continue
            if not self.privileged and not attr.startswith("user."):
                continue
            try:
                os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
            except OSError as exc:
                log.warning("cannot set xattr %r on %r: %s", attr, member.name, exc)


_Writer = Callable[[tarfile.TarFile, tarfile.TarInfo, Dir, str, bool], None]


def _lstat(name: str, directory: Dir) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    ns = int(member.mtime * 1_000_000_000)
    return ns, ns
