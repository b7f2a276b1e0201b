"""Snapshot archives: one file that carries a snapshot to another host.

An archive is a tar stream (zstd-compressed when asked: the memory blob compresses well)
holding, in this order: ``kelpie-snapshot.json`` (what the runtime knows about the
snapshot: name, kind, the sandbox's VM config and exec defaults), ``manifest.json`` (the
snapshot's self-checksummed manifest), then every blob the manifest lists. Reading is
strict: regular files only, plain names only, each name once, nothing the manifest does not
list, every blob checked against the manifest before the snapshot is accepted.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from kelpie.vm import (
    MANIFEST_NAME,
    LocalStorage,
    SnapshotCorrupted,
    SnapshotManifest,
    Storage,
)

META_NAME = "kelpie-snapshot.json"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20
MAX_META_BYTES = 1 << 20


def write_archive(out: IO[bytes], snapshot_dir: Path, meta: dict[str, Any], *,
                  compress: bool = False, storage: Storage | None = None) -> None:
    """Write the archive of the snapshot in ``snapshot_dir`` (read through ``storage``)."""
    store = storage or LocalStorage()
    manifest_data = store.read_bytes(snapshot_dir / MANIFEST_NAME)
    manifest = SnapshotManifest.from_json(manifest_data)
    with contextlib.ExitStack() as stack:
        target: IO[bytes] = out
        if compress:
            target = stack.enter_context(
                zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(
                    out, closefd=False))
        with tarfile.open(fileobj=target, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, META_NAME, json.dumps(meta, sort_keys=True, indent=2).encode())
            _add_bytes(tar, MANIFEST_NAME, manifest_data)
            for name in sorted(manifest.blobs):
                info = tarfile.TarInfo(name)
                info.size = store.size(snapshot_dir / name)
                info.mode = 0o644
                with store.open_read(snapshot_dir / name) as blob:
                    tar.addfile(info, blob)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read_archive(source: IO[bytes], dest: Path, *, storage: Storage | None = None,
                 ) -> tuple[dict[str, Any], SnapshotManifest]:
    """Unpack an archive into the new directory ``dest``; return its metadata and manifest.

    Raises :class:`SnapshotCorrupted` naming what is wrong; ``dest`` may then hold part of
    the archive (the caller removes it).
    """
    store = storage or LocalStorage()
    if store.exists(dest):
        raise FileExistsError(f"cannot unpack a snapshot archive into {dest}: it exists")
    store.mkdir(dest)
    try:
        return _read(source, dest, store)
    except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
        raise SnapshotCorrupted(f"snapshot archive is damaged or truncated: {exc}") from None


def _read(source: IO[bytes], dest: Path, store: Storage,
          ) -> tuple[dict[str, Any], SnapshotManifest]:
    meta: dict[str, Any] | None = None
    manifest: SnapshotManifest | None = None
    seen: set[str] = set()
    with _decompressed(source) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = member.name
            if not member.isfile():
                raise SnapshotCorrupted(f"snapshot archive entry {name!r} is not a regular file")
            if "/" in name or name.startswith(".") or name in seen or not name:
                raise SnapshotCorrupted(f"snapshot archive entry {name!r} is not a plain, "
                                        "unique file name")
            seen.add(name)
            extracted = tar.extractfile(member)
            assert extracted is not None
            if name == META_NAME:
                meta = _meta(extracted.read(MAX_META_BYTES + 1))
                continue
            if meta is None:
                raise SnapshotCorrupted(f"snapshot archive must start with {META_NAME}")
            if name == MANIFEST_NAME:
                data = extracted.read()
                manifest = SnapshotManifest.from_json(data)
                store.write_bytes(dest / MANIFEST_NAME, data)
                continue
            if manifest is None:
                raise SnapshotCorrupted(f"snapshot archive must have {MANIFEST_NAME} "
                                        "before its blobs")
            if name not in manifest.blobs:
                raise SnapshotCorrupted(f"snapshot archive has {name!r}, which its manifest "
                                        "does not list")
            with store.open_write(dest / name) as out:
                while chunk := extracted.read(CHUNK):
                    out.write(chunk)
    if meta is None or manifest is None:
        raise SnapshotCorrupted(f"not a snapshot archive: it lacks {META_NAME} or "
                                f"{MANIFEST_NAME}")
    missing = sorted(set(manifest.blobs) - seen)
    if missing:
        raise SnapshotCorrupted(f"snapshot archive lacks blob(s) {', '.join(missing)} "
                                "(truncated?)")
    return meta, manifest


def _meta(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_META_BYTES:
        raise SnapshotCorrupted(f"{META_NAME} is over {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise SnapshotCorrupted(f"{META_NAME} is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise SnapshotCorrupted(f"{META_NAME} must hold a JSON object")
    return meta


@contextlib.contextmanager
def _decompressed(source: IO[bytes]) -> Iterator[IO[bytes]]:
    """``source`` as a plain stream, decompressing zstd when it starts with zstd's magic."""
    reader = io.BufferedReader(cast(io.RawIOBase, source))
    head = reader.peek(4)[:4]
    if head == ZSTD_MAGIC:
        with zstandard.ZstdDecompressor().stream_reader(reader) as plain:
            yield cast(IO[bytes], plain)
    else:
        yield reader
