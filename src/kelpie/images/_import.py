"""Importing images from local files: OCI image layouts and ``docker save`` archives.

Both are untrusted input, treated like a registry: every blob is copied through
:meth:`BlobStore.put`, which stores it only if it hashes to the digest that names it.

OCI image layout (a directory, or a tar of one, maybe compressed): ``oci-layout`` says
version 1.0.0; ``index.json`` lists manifests (or nested indexes, narrowed to one
platform). The ``org.opencontainers.image.ref.name`` annotation names an entry: either a
full reference (``example.com/app:1``) or, as skopeo and umoci write, just a tag (``1``).

``docker save`` archive: ``manifest.json`` lists images as ``Config`` (a file holding the
image config), ``RepoTags`` and ``Layers`` (files holding uncompressed layer tars, bottom
first). There is no distribution manifest in it, so one is built: a **Docker schema 2**
manifest (``application/vnd.docker.distribution.manifest.v2+json``) whose config is the
archive's config (digest computed from its bytes) and whose layers are the archive's tars
as ``application/vnd.docker.image.rootfs.diff.tar``, each verified against the config's
``rootfs.diff_ids``. Docker schema 2 rather than OCI because the config and layers are
Docker's own formats; the manifest is serialised deterministically, so importing the same
archive twice gives the same image digest. Layers that are compressed (newer Docker
versions) must be named ``blobs/sha256/<hex>`` and are verified against that name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from kelpie.images._digest import sha256_digest, validate_digest
from kelpie.images._errors import (
    BlobNotFound,
    DigestMismatch,
    ImageError,
    ImageNotFound,
    InvalidManifest,
)
from kelpie.images._manifest import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MAX_DOCUMENT_BYTES,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_image_config,
    parse_manifest_document,
    select_platform,
)
from kelpie.images._reference import ImageReference

if TYPE_CHECKING:
    from kelpie.images._store import ImageStore, StoredImage

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
"""The index.json annotation that names an image in an OCI layout."""

LAYOUT_VERSION = "1.0.0"
"""The only ``imageLayoutVersion`` understood."""

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


class _Source(Protocol):
    """Files of a layout or archive, by ``/``-separated name relative to its root."""

    def exists(self, name: str) -> bool:
        """Whether there is a readable file ``name``."""

    def open(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Open file ``name`` for reading; :class:`ImageError` if there is none."""

    def describe(self) -> str:
        """Where the files come from, for error messages."""


class _DirectorySource:
    def __init__(self, root: Path) -> None:
        self._root = root

    def exists(self, name: str) -> bool:
        return (self._root / name).is_file()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        try:
            file = (self._root / name).open("rb")
        except OSError as exc:
            raise ImageError(f"{self.describe()}: cannot read {name!r}: {exc}") from exc
        with file:
            yield file

    def describe(self) -> str:
        return f"image layout {self._root}"


class _TarSource:
    """Members of a tar; links are resolved inside the archive only (tarfile does that)."""

    def __init__(self, archive: tarfile.TarFile, path: Path) -> None:
        self._archive = archive
        self._path = path
        self._members = {
            os.path.normpath(m.name).lstrip("/"): m
            for m in archive.getmembers()
            if m.isfile() or m.issym() or m.islnk()
        }

    def exists(self, name: str) -> bool:
        return os.path.normpath(name) in self._members

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        member = self._members.get(os.path.normpath(name))
        try:
            file = self._archive.extractfile(member) if member is not None else None
        except (KeyError, tarfile.TarError) as exc:  # a link to a member that is missing
            raise ImageError(f"{self.describe()}: cannot read {name!r}: {exc}") from exc
        if file is None:
            raise ImageError(f"{self.describe()} has no file {name!r}")
        with file:
            yield cast(BinaryIO, file)

    def describe(self) -> str:
        return f"archive {self._path}"


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[_Source]:
    if path.is_dir():
        yield _DirectorySource(path)
        return
    try:
        archive = tarfile.open(path, "r:*")  # noqa: SIM115 -- closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"cannot read {path} as a directory or tar archive: {exc}") from exc
    with archive:
        yield _TarSource(archive, path)


def _read_document(source: _Source, name: str) -> bytes:
    with source.open(name) as file:
        data = file.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ImageError(f"{source.describe()}: {name} is over {MAX_DOCUMENT_BYTES} bytes")
    return data


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + validate_digest(digest).removeprefix("sha256:")


def _copy_blob(source: _Source, store: ImageStore, descriptor: Descriptor) -> None:
    """Copy one blob of the layout into the store, verified against its descriptor."""
    if store.blobs.has(descriptor.digest):
        return
    name = _blob_name(descriptor.digest)
    if not source.exists(name):
        raise BlobNotFound(descriptor.digest, source.describe())
    with source.open(name) as file:
        store.blobs.put(file, descriptor.digest, size=descriptor.size)


def _read_verified(source: _Source, descriptor: Descriptor) -> bytes:
    """The bytes of a small blob (a manifest), checked against digest and size."""
    if descriptor.size > MAX_DOCUMENT_BYTES:
        raise ImageError(f"manifest {descriptor.digest} declares {descriptor.size} bytes; too big")
    data = _read_document(source, _blob_name(descriptor.digest))
    actual = sha256_digest(data)
    if actual != descriptor.digest or len(data) != descriptor.size:
        raise DigestMismatch(
            descriptor.digest, actual, expected_size=descriptor.size,
            actual_size=len(data), what=f"manifest in {source.describe()}",
        )
    return data


# -- OCI image layout ------------------------------------------------------------------


def import_oci_layout(
    source: Path | str,
    store: ImageStore,
    *,
    reference: ImageReference | str | None = None,
    platform: Platform | None = None,
) -> list[StoredImage]:
    """Import the images of an OCI image layout (directory or tar) into ``store``.

    Without ``reference`` every entry of ``index.json`` is imported and tagged with its
    ``ref.name`` annotation when that is a full reference (a bare tag has no repository
    to belong to, so such an entry is imported untagged). With ``reference``, one entry is
    imported and tagged as ``reference``: the only entry, or the one whose ``ref.name`` is
    the reference's tag or the reference itself. An entry that is an index is narrowed to
    ``platform`` (default: this host's). Returns the stored images in index order.
    """
    wanted = ImageReference.parse(reference) if isinstance(reference, str) else reference
    with _open_source(Path(source)) as layout:
        entries = _layout_entries(layout)
        chosen = [_pick_entry(entries, wanted, layout)] if wanted else entries
        return [
            _import_entry(layout, store, entry, _entry_reference(entry, wanted), platform)
            for entry in chosen
        ]


def _layout_entries(layout: _Source) -> list[Descriptor]:
    try:
        marker = json.loads(_read_document(layout, "oci-layout"))
    except ValueError as exc:
        raise ImageError(f"{layout.describe()}: oci-layout is not JSON") from exc
    version = marker.get("imageLayoutVersion") if isinstance(marker, dict) else None
    if version != LAYOUT_VERSION:
        raise ImageError(
            f"{layout.describe()}: imageLayoutVersion is {version!r}; only "
            f"{LAYOUT_VERSION!r} is supported"
        )
    index = parse_manifest_document(_read_document(layout, "index.json"), None)
    if not isinstance(index, Index):
        raise InvalidManifest("index.json", "it must be an image index, not a manifest")
    if not index.manifests:
        raise ImageNotFound(f"{layout.describe()} holds no images (index.json is empty)")
    return list(index.manifests)


def _pick_entry(
    entries: list[Descriptor], wanted: ImageReference, layout: _Source
) -> Descriptor:
    if len(entries) == 1:
        return entries[0]
    names = {str(wanted), wanted.familiar, wanted.tag}
    for entry in entries:
        if entry.annotations.get(REF_NAME_ANNOTATION) in names:
            return entry
    listed = ", ".join(
        sorted(e.annotations.get(REF_NAME_ANNOTATION, e.digest) for e in entries)
    )
    raise ImageNotFound(
        f"{layout.describe()} has {len(entries)} images and none is named {wanted.tag!r}; "
        f"they are: {listed}"
    )


def _entry_reference(entry: Descriptor, wanted: ImageReference | None) -> ImageReference | None:
    if wanted is not None:
        return wanted
    name = entry.annotations.get(REF_NAME_ANNOTATION)
    if not name or ("/" not in name and ":" not in name):
        return None
    try:
        return ImageReference.parse(name)
    except ImageError:
        return None


def _import_entry(
    layout: _Source,
    store: ImageStore,
    entry: Descriptor,
    reference: ImageReference | None,
    platform: Platform | None,
) -> StoredImage:
    data = _read_verified(layout, entry)
    document = parse_manifest_document(data, entry.media_type)
    if isinstance(document, Index):
        entry = select_platform(document, platform or Platform.host())
        data = _read_verified(layout, entry)
        document = parse_manifest_document(data, entry.media_type)
        if reference is not None and reference.digest is not None:
            reference = replace(reference, digest=None)
    if not isinstance(document, Manifest):
        raise InvalidManifest("image index entry", "nested indexes are not supported")
    for descriptor in (document.config, *document.layers):
        _copy_blob(layout, store, descriptor)
    return store.add_image(reference, data, document.media_type)


# -- docker save archives --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ArchiveImage:
    config: str
    tags: tuple[str, ...]
    layers: tuple[str, ...]


def import_docker_archive(source: Path | str, store: ImageStore) -> list[StoredImage]:
    """Import the images of a ``docker save`` tar into ``store`` (see the module notes).

    Each image is recorded under every tag in its ``RepoTags`` (untagged if none). Raises
    :class:`DigestMismatch` if a layer does not match its config's ``diff_ids``.
    """
    path = Path(source)
    with _open_source(path) as archive:
        images = _archive_images(archive)
        return [_import_archive_image(archive, store, image) for image in images]


def _archive_images(archive: _Source) -> list[_ArchiveImage]:
    try:
        document = json.loads(_read_document(archive, "manifest.json"))
    except ValueError as exc:
        raise ImageError(f"{archive.describe()}: manifest.json is not JSON") from exc
    if not isinstance(document, list) or not document:
        raise ImageError(f"{archive.describe()}: manifest.json must be a non-empty list")
    return [_archive_image(item, archive) for item in document]


def _archive_image(item: Any, archive: _Source) -> _ArchiveImage:
    where = f"{archive.describe()}: manifest.json entry"
    if not isinstance(item, dict) or not isinstance(item.get("Config"), str):
        raise ImageError(f"{where} needs a 'Config' file name")
    layers, tags = item.get("Layers"), item.get("RepoTags") or []
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ImageError(f"{where}: 'Layers' must be a list of file names")
    if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
        raise ImageError(f"{where}: 'RepoTags' must be a list of references")
    return _ArchiveImage(item["Config"], tuple(tags), tuple(layers))


def _import_archive_image(
    archive: _Source, store: ImageStore, image: _ArchiveImage
) -> StoredImage:
    config = _read_document(archive, image.config)
    diff_ids = parse_image_config(config).diff_ids
    if len(diff_ids) != len(image.layers):
        raise InvalidManifest(
            f"image config {image.config}",
            f"it lists {len(diff_ids)} diff_ids but the archive has {len(image.layers)} layers",
        )
    config_descriptor = Descriptor(DOCKER_CONFIG, sha256_digest(config), len(config))
    store.blobs.put(config, config_descriptor.digest, size=len(config))
    layers = [
        _import_archive_layer(archive, store, name, diff_id)
        for name, diff_id in zip(image.layers, diff_ids, strict=True)
    ]
    manifest = _docker_manifest(config_descriptor, layers)
    references: list[ImageReference | None] = [ImageReference.parse(t) for t in image.tags]
    stored = [store.add_image(ref, manifest, DOCKER_MANIFEST) for ref in references or [None]]
    return stored[-1]


def _import_archive_layer(
    archive: _Source, store: ImageStore, name: str, diff_id: str
) -> Descriptor:
    with archive.open(name) as file:
        head = file.read(4)
    media_type = _layer_media_type(head)
    # An uncompressed layer is its own diff, so it is verified against the config's diff_id.
    digest = diff_id if media_type == DOCKER_LAYER else _digest_from_name(name, archive)
    with archive.open(name) as file:
        store.blobs.put(file, digest)
    return Descriptor(media_type, digest, store.blobs.path(digest).stat().st_size)


def _layer_media_type(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return DOCKER_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return _ZSTD_LAYER
    return DOCKER_LAYER


def _digest_from_name(name: str, archive: _Source) -> str:
    directory, _, hex_digest = os.path.normpath(name).rpartition("/")
    if directory != "blobs/sha256":
        raise ImageError(
            f"{archive.describe()}: layer {name!r} is compressed but not named "
            "blobs/sha256/<digest>, so it cannot be verified; re-save the image"
        )
    return validate_digest("sha256:" + hex_digest)


def _docker_manifest(config: Descriptor, layers: list[Descriptor]) -> bytes:
    def descriptor(d: Descriptor) -> dict[str, object]:
        return {"mediaType": d.media_type, "size": d.size, "digest": d.digest}

    document = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(config),
        "layers": [descriptor(layer) for layer in layers],
    }
    return json.dumps(document, indent=3).encode()
