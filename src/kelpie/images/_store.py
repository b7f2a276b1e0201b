"""The local image store: verified blobs, tags, reference counts and cached root filesystems.

Layout under ``root`` (default :func:`kelpie._paths.images_dir`)::

    blobs/sha256/<hex>     manifests, configs and layers (see BlobStore)
    tmp/                   blobs being written
    images.json            image records: tags, holders, the blobs each image uses
    rootfs/<hex>/          unpacked root directory of image <hex> (see rootfs_dir)
    ext4/<hex>.ext4        ext4 disk image of image <hex> (see rootfs_ext4)
    ext4/<hex>-<N>m.ext4   the same filling a disk of N MiB
    build/                 root filesystems being built
    .lock                  flock(2) serialising changes to images.json and deletions

``images.json`` is replaced atomically (write, fsync, rename). Blobs are only deleted while
holding the lock, and an image is recorded only after its blobs are verified and, under the
same lock, still present: a removal can never take a blob an image being added relies on.
Blobs that belong to no image (an interrupted pull) are kept for ``orphan_age`` seconds, so
a pull in progress is not pruned from under the puller.

An image is in use while it has *holders* (a sandbox, a snapshot, a template): neither
:meth:`ImageStore.remove` nor :meth:`ImageStore.prune` deletes a held image or its caches.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kelpie._exceptions import ConfigError, StorageError
from kelpie._fsutil import write_atomic
from kelpie._paths import images_dir
from kelpie.images._blobs import BlobStore
from kelpie.images._digest import sha256_digest, validate_digest
from kelpie.images._errors import (
    SHORT_ID_LENGTH,
    AmbiguousImage,
    BlobNotFound,
    DigestMismatch,
    ImageInUse,
    ImageNotFound,
    InvalidDigest,
    InvalidManifest,
    InvalidReference,
    LayerError,
)
from kelpie.images._layer import LAYER_MEDIA_TYPES
from kelpie.images._manifest import (
    CONFIG_MEDIA_TYPES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    parse_image_config,
    parse_manifest_document,
)
from kelpie.images._reference import ImageReference

INDEX_FILE = "images.json"
"""Name of the image records file under the store root."""

INDEX_VERSION = 1
"""Format version of ``images.json``; other versions are refused, not guessed at."""

DEFAULT_ORPHAN_AGE = 3600.0
"""Seconds an unreferenced blob or build leftover is kept before prune deletes it."""

"""Hex digits of the manifest digest shown as an image id."""

MAX_HOLDER_LENGTH = 256
"""Longest holder name accepted by :meth:`ImageStore.retain`."""

_HEX = re.compile(r"[0-9a-f]{1,64}")




@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image in the store: its manifest digest, tags, manifest and parsed config.

    ``size`` is the manifest, config and layers as stored (compressed) in bytes; ``tags``
    are fully qualified references (``docker.io/library/alpine:3.19``).
    """

    digest: str
    tags: tuple[str, ...]
    manifest: Manifest
    config: ImageConfig
    size: int
    media_type: str
    holders: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """The short id: the first 12 hex digits of the manifest digest."""
        return self.digest.removeprefix("sha256:")[:SHORT_ID_LENGTH]


@dataclass(slots=True)
class _Record:
    """One image's entry in ``images.json``."""

    media_type: str
    blobs: list[str]
    tags: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)
    added: float = 0.0
    architecture: str = ""
    """The OCI architecture of the image (``amd64``, ``arm64``); empty in records written
    before it was kept. A tag names one image per architecture."""

    def to_json(self) -> dict[str, Any]:
        return {
            "media_type": self.media_type,
            "blobs": self.blobs,
            "tags": sorted(self.tags),
            "holders": sorted(self.holders),
            "added": self.added,
            "architecture": self.architecture,
        }


_Records = dict[str, _Record]
_Victims = list[tuple[str, _Record]]


class ImageStore:
    """Images stored on this host, built on a verified :class:`BlobStore`."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else images_dir()
        self.blobs = BlobStore(self.root)

    # -- paths of the caches (built by kelpie.images._rootfs_build) -----------------------

    def rootfs_cache(self, digest: str) -> Path:
        """Where the unpacked root directory of image ``digest`` is cached."""
        return self.root / "rootfs" / validate_digest(digest).removeprefix("sha256:")

    def ext4_cache(self, digest: str, size_mib: int | None = None) -> Path:
        """Where the ext4 disk image of image ``digest`` is cached (``size_mib``: the one
        that fills a disk of that size; else the one sized to the content)."""
        name = validate_digest(digest).removeprefix("sha256:")
        return self.root / "ext4" / (name + ("" if size_mib is None else f"-{size_mib}m")
                                     + ".ext4")

    def ext4_caches(self, digest: str) -> list[Path]:
        """Every cached ext4 disk image of image ``digest`` (any size)."""
        name = validate_digest(digest).removeprefix("sha256:")
        return sorted(set((self.root / "ext4").glob(f"{name}.ext4"))
                      | set((self.root / "ext4").glob(f"{name}-*m.ext4")))

    @property
    def build_dir(self) -> Path:
        """Scratch space for root filesystems being built (same filesystem as the caches)."""
        return self.root / "build"

    # -- adding and finding -----------------------------------------------------------

    def add_image(
        self, reference: ImageReference | None, manifest: bytes, media_type: str
    ) -> StoredImage:
        """Record the image whose manifest is ``manifest``, tagged by ``reference``.

        The config and every layer must already be in :attr:`blobs`; each is verified
        (content and declared size) before anything is recorded. The manifest itself is
        stored as a blob. A tag already on another image moves to this one. A reference
        with a digest must name this manifest's digest.
        """
        parsed = parse_manifest_document(manifest, media_type)
        if isinstance(parsed, Index):
            raise InvalidManifest(
                "image",
                "this document is an index (one manifest per platform); pick the platform's "
                "manifest with select_platform and add that",
            )
        digest = sha256_digest(manifest)
        if reference is not None and reference.digest not in (None, digest):
            raise DigestMismatch(str(reference.digest), digest, what="image manifest")
        config = self._verified_config(parsed)
        self.blobs.put(manifest, digest)
        blobs = [parsed.config.digest, *(layer.digest for layer in parsed.layers)]
        with self._locked() as records:
            self._require_present([digest, *blobs])
            record = records.get(digest) or _Record(parsed.media_type, blobs, added=time.time())
            record.architecture = config.architecture
            records[digest] = record
            if reference is not None and reference.tag is not None:
                _move_tag(records, _tag_key(reference), digest)
            self._save(records)
            return self._image(digest, record, parsed, config)

    def resolve(self, text: str, *, architecture: str | None = None) -> StoredImage:
        """Find an image by tag reference, ``name@sha256:...``, ``sha256:...`` or id prefix.

        A tag names one image per architecture: ``architecture`` (OCI's spelling: ``amd64``,
        ``arm64``) picks one; without it, this host's, else the only one there is.
        Raises :class:`ImageNotFound` if nothing matches (for a tag held only for other
        architectures, naming them), :class:`AmbiguousImage` if an id prefix matches several
        images, :class:`InvalidReference` if ``text`` is neither.
        """
        with self._locked(shared=True) as records:
            digest, _ = _find(records, text, self.root, architecture)
            image = self._load(digest, records[digest])
        if architecture is not None and image.config.architecture not in ("", architecture):
            raise ImageNotFound(
                f"image {text!r} is for {image.config.platform}, not {architecture}: pull it "
                f"for linux/{architecture} (kelpie pull --platform linux/{architecture} ...)")
        return image

    def get(self, digest: str) -> StoredImage:
        """The image with manifest digest ``digest`` exactly."""
        with self._locked(shared=True) as records:
            record = records.get(validate_digest(digest))
            if record is None:
                raise ImageNotFound(f"no image {digest} in the image store at {self.root}")
            return self._load(digest, record)

    def list(self) -> list[StoredImage]:
        """Every stored image, oldest first."""
        with self._locked(shared=True) as records:
            ordered = sorted(records.items(), key=lambda item: (item[1].added, item[0]))
            return [self._load(digest, record) for digest, record in ordered]

    # -- reference counting -----------------------------------------------------------

    def retain(self, image_digest: str, holder: str) -> None:
        """Mark image ``image_digest`` as used by ``holder`` (idempotent).

        A held image is never deleted by :meth:`remove` or :meth:`prune`.
        """
        _check_holder(holder)
        with self._locked() as records:
            record = records.get(validate_digest(image_digest))
            if record is None:
                raise ImageNotFound(
                    f"cannot retain image {image_digest} for {holder!r}: it is not in the "
                    f"image store at {self.root}"
                )
            if holder not in record.holders:
                record.holders.append(holder)
                self._save(records)

    def release(self, image_digest: str, holder: str) -> bool:
        """Drop ``holder``'s use of the image; return whether it was held by ``holder``.

        The image itself stays until it is removed or pruned.
        """
        with self._locked() as records:
            record = records.get(validate_digest(image_digest))
            if record is None or holder not in record.holders:
                return False
            record.holders.remove(holder)
            self._save(records)
            return True

    def holders(self, image_digest: str) -> tuple[str, ...]:
        """Who holds the image (empty if nobody, or if it is not stored)."""
        with self._locked(shared=True) as records:
            record = records.get(validate_digest(image_digest))
            return tuple(sorted(record.holders)) if record else ()

    # -- removing ---------------------------------------------------------------------

    def remove(self, text: str, *, force: bool = False) -> builtins.list[str]:
        """Untag or delete an image; return the digests of the images deleted.

        By tag: the tag is removed, and the image is deleted once it has no tags and no
        holders. By digest or id: the image is deleted; without ``force`` this is refused
        if it is held or has more than one tag. With ``force`` a held image loses its tags
        but stays (with its blobs and caches) until it is released and pruned.
        """
        with self._locked() as records:
            digest, tag = _find(records, text, self.root)
            record = records[digest]
            if tag is not None:
                record.tags.remove(tag)
            else:
                _check_removable(digest, record, force)
                record.tags.clear()
            if record.tags or record.holders:
                self._save(records)
                return []
            del records[digest]
            self._save(records)
            self._collect(records, [(digest, record)], orphan_age=None)
            return [digest]

    def prune(self, *, orphan_age: float = DEFAULT_ORPHAN_AGE) -> builtins.list[str]:
        """Delete untagged images nobody holds, and blobs and caches no image uses.

        Returns the digests of the images deleted. Blobs and build leftovers that belong to
        no image are deleted only once older than ``orphan_age`` seconds.
        """
        with self._locked() as records:
            victims = [(d, r) for d, r in records.items() if not r.tags and not r.holders]
            for digest, _ in victims:
                del records[digest]
            if victims:
                self._save(records)
            self._collect(records, victims, orphan_age=orphan_age)
            return sorted(digest for digest, _ in victims)

    # -- internals --------------------------------------------------------------------

    def _verified_config(self, manifest: Manifest) -> ImageConfig:
        if manifest.config.media_type not in CONFIG_MEDIA_TYPES:
            raise InvalidManifest(
                "image manifest",
                f"config media type {manifest.config.media_type!r} is not a container image "
                f"config; expected one of {', '.join(sorted(CONFIG_MEDIA_TYPES))}",
            )
        for layer in manifest.layers:
            if layer.media_type not in LAYER_MEDIA_TYPES:
                raise LayerError(
                    f"layer {layer.digest} has media type {layer.media_type!r}; supported: "
                    f"{', '.join(sorted(LAYER_MEDIA_TYPES))}"
                )
        for descriptor in (manifest.config, *manifest.layers):
            self._verify_blob(descriptor)
        config = parse_image_config(self.blobs.read_bytes(manifest.config.digest))
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidManifest(
                "image",
                f"the manifest has {len(manifest.layers)} layers but the config lists "
                f"{len(config.diff_ids)} diff_ids; they must correspond one to one",
            )
        return config

    def _verify_blob(self, descriptor: Descriptor) -> None:
        if not self.blobs.has(descriptor.digest):
            raise BlobNotFound(descriptor.digest, f"the image store at {self.root}")
        self.blobs.verify(descriptor.digest)
        actual = self.blobs.path(descriptor.digest).stat().st_size
        if actual != descriptor.size:
            raise InvalidManifest(
                "image manifest",
                f"blob {descriptor.digest} is declared as {descriptor.size} bytes but has "
                f"{actual}",
            )

    def _require_present(self, digests: builtins.list[str]) -> None:
        for digest in digests:
            if not self.blobs.has(digest):
                raise BlobNotFound(digest, f"the image store at {self.root}")

    def _image(
        self, digest: str, record: _Record, manifest: Manifest, config: ImageConfig
    ) -> StoredImage:
        size = sum(self._blob_size(d) for d in {digest, *record.blobs})
        return StoredImage(
            digest=digest,
            tags=tuple(sorted(record.tags)),
            manifest=manifest,
            config=config,
            size=size,
            media_type=record.media_type,
            holders=tuple(sorted(record.holders)),
        )

    def _blob_size(self, digest: str) -> int:
        try:
            return self.blobs.path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def _load(self, digest: str, record: _Record) -> StoredImage:
        try:
            parsed = parse_manifest_document(self.blobs.read_bytes(digest), record.media_type)
            if not isinstance(parsed, Manifest):
                raise InvalidManifest("stored image", f"{digest} is not an image manifest")
            config = parse_image_config(self.blobs.read_bytes(parsed.config.digest))
        except BlobNotFound as exc:
            raise BlobNotFound(
                exc.digest, f"the image store at {self.root} (image {digest} is damaged: "
                "remove it and pull it again)"
            ) from exc
        return self._image(digest, record, parsed, config)

    def _collect(
        self, records: _Records, victims: _Victims, *, orphan_age: float | None
    ) -> None:
        """Delete blobs and caches no remaining image uses (call with the lock held)."""
        used = set(records)
        for record in records.values():
            used.update(record.blobs)
        for digest, record in victims:
            for blob in (digest, *record.blobs):
                if blob not in used:
                    self.blobs.delete(blob)
        for digest, _ in victims:
            remove_tree(self.rootfs_cache(digest))
            for cached in self.ext4_caches(digest):
                remove_tree(cached)
        if orphan_age is not None:
            self._collect_orphans(used, orphan_age)

    def _collect_orphans(self, used: set[str], orphan_age: float) -> None:
        cutoff = time.time() - orphan_age
        blob_dir = self.blobs.root / "blobs" / "sha256"
        for path in _entries(blob_dir):
            digest = "sha256:" + path.name
            if digest not in used and _older_than(path, cutoff) and _is_digest(digest):
                self.blobs.delete(digest)
        for cache in (self.root / "rootfs", self.root / "ext4"):
            for path in _entries(cache):
                digest = "sha256:" + path.name.removesuffix(".ext4").split("-")[0]
                if digest not in used and _older_than(path, cutoff):
                    remove_tree(path)
        for scratch in (self.build_dir, self.root / "tmp"):
            for path in _entries(scratch):
                if _older_than(path, cutoff):
                    remove_tree(path)

    @contextlib.contextmanager
    def _locked(self, *, shared: bool = False) -> Iterator[_Records]:
        """Hold the store lock and yield the image records read under it.

        Reading a store that does not exist yet yields no records and creates nothing.
        """
        if shared and not (self.root / INDEX_FILE).exists():
            yield {}
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open the image store at {self.root}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)

    def _read(self) -> _Records:
        path = self.root / INDEX_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc
        try:
            return _parse_records(json.loads(raw))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StorageError(
                f"the image records {path} are damaged ({exc}); move the file away to start "
                "an empty store (blobs are kept and pruned later)"
            ) from exc

    def _save(self, records: _Records) -> None:
        document = {
            "version": INDEX_VERSION,
            "images": {digest: records[digest].to_json() for digest in sorted(records)},
        }
        data = json.dumps(document, indent=1).encode() + b"\n"
        _write_atomically(self.root / INDEX_FILE, data)


def _parse_records(document: Any) -> _Records:
    if document.get("version") != INDEX_VERSION:
        raise ValueError(f"version {document.get('version')!r}, expected {INDEX_VERSION}")
    records: _Records = {}
    for digest, entry in document["images"].items():
        records[validate_digest(digest)] = _Record(
            media_type=str(entry["media_type"]),
            blobs=[validate_digest(b) for b in entry["blobs"]],
            tags=[str(t) for t in entry["tags"]],
            holders=[str(h) for h in entry["holders"]],
            added=float(entry["added"]),
            architecture=str(entry.get("architecture", "")),
        )
    return records


def _tag_key(reference: ImageReference) -> str:
    """The stored form of a tag: the fully qualified reference without a digest."""
    return str(ImageReference(reference.registry, reference.repository, reference.tag))


def _move_tag(records: _Records, tag: str, digest: str) -> None:
    """Tag ``digest``, taking the tag from the image of the same architecture that had it."""
    architecture = records[digest].architecture
    for other in records.values():
        if tag in other.tags and other.architecture in ("", architecture):
            other.tags.remove(tag)
    if tag not in records[digest].tags:
        records[digest].tags.append(tag)


def _by_tag(records: _Records, tag: str, architecture: str | None, text: str) -> str | None:
    """The image ``tag`` names for ``architecture`` (None: this host's, else the only
    one); None when no image has the tag."""
    holders = {d: r.architecture for d, r in records.items() if tag in r.tags}
    if not holders:
        return None
    wanted = architecture or Platform.host().architecture
    for digest, held in holders.items():
        if held in ("", wanted):
            return digest
    if architecture is None and len(holders) == 1:
        return next(iter(holders))
    raise ImageNotFound(
        f"image {text!r} is stored for {', '.join(sorted(f'linux/{a}' for a in holders.values()))}"
        f", not linux/{wanted}: pull it for that platform (kelpie pull --platform "
        f"linux/{wanted} ...)")


def _find(records: _Records, text: str, root: Path,
          architecture: str | None = None) -> tuple[str, str | None]:
    """Resolve ``text`` to (manifest digest, matched tag or None)."""
    text = text.strip()
    if text.startswith("sha256:"):
        return _by_prefix(records, text.removeprefix("sha256:"), text, root), None
    reference: ImageReference | None = None
    try:
        reference = ImageReference.parse(text)
    except InvalidReference:
        if not _HEX.fullmatch(text):
            raise
    if reference is not None and reference.digest is not None:
        if reference.digest in records:
            return reference.digest, None
        raise ImageNotFound(f"no image with digest {reference.digest} in the store at {root}")
    if reference is not None:
        tag = _tag_key(reference)
        found = _by_tag(records, tag, architecture, text)
        if found is not None:
            return found, tag
    if _HEX.fullmatch(text):
        with contextlib.suppress(ImageNotFound):
            return _by_prefix(records, text, text, root), None
    raise ImageNotFound(
        f"no image {text!r} in the image store at {root}; give a tag reference "
        "(alpine:3.19), a digest (sha256:...) or an image id prefix of a stored image"
    )


def _by_prefix(records: _Records, prefix: str, text: str, root: Path) -> str:
    if not _HEX.fullmatch(prefix):
        raise InvalidDigest(text, "an image id or digest prefix is 1-64 lowercase hex digits")
    matches = sorted(d for d in records if d.removeprefix("sha256:").startswith(prefix))
    if len(matches) > 1:
        raise AmbiguousImage(text, matches)
    if not matches:
        raise ImageNotFound(f"no image with id or digest {text!r} in the image store at {root}")
    return matches[0]


def _check_removable(digest: str, record: _Record, force: bool) -> None:
    if force:
        return
    short = digest.removeprefix("sha256:")[:SHORT_ID_LENGTH]
    if record.holders:
        raise ImageInUse(
            f"image {short} is in use by {', '.join(sorted(record.holders))}; release it "
            "first, or force to untag it now (it is deleted once released and pruned)"
        )
    if len(record.tags) > 1:
        raise ImageInUse(
            f"image {short} has {len(record.tags)} tags ({', '.join(sorted(record.tags))}); "
            "remove them one by one, or force to remove the image with all its tags"
        )


def _check_holder(holder: str) -> None:
    if not holder or len(holder) > MAX_HOLDER_LENGTH or not holder.isprintable():
        raise ConfigError(
            [
                f"{holder!r} must be 1-{MAX_HOLDER_LENGTH} printable characters, "
                "e.g. 'sandbox:<id>' or 'snapshot:<id>'"
            ],
            what="image holder",
        )


def _is_digest(digest: str) -> bool:
    try:
        validate_digest(digest)
    except InvalidDigest:
        return False
    return True


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def remove_tree(path: Path) -> None:
    """Delete a file or a whole tree, even directories a layer made read-only."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
    elif sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=_retry_writable)
    else:
        shutil.rmtree(path, onerror=lambda f, p, e: _retry_writable(f, p, e[1]))


def _retry_writable(function: Callable[[str], object], failed: str, exc: BaseException) -> None:
    """rmtree error handler: make the parent writable and try once more."""
    if isinstance(exc, FileNotFoundError):
        return
    os.chmod(os.path.dirname(failed), 0o700)
    with contextlib.suppress(FileNotFoundError):
        function(failed)


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc
