"""Image manifests, indexes and configs: parsing untrusted JSON into checked, frozen values.

Accepted documents are the OCI image manifest and index and their Docker v2 schema 2
counterparts (manifest and manifest list). Docker schema 1 (signed, no content-addressed
config) is refused. Every digest is validated before it is returned, so nothing parsed
here can carry path syntax into the blob store.

Errors defined here extend the image error tree (see :mod:`kelpie.images._errors`)::

    ImageError
    ├── InvalidManifest        a manifest, index or config document is malformed (ValueError)
    ├── InvalidPlatform        a platform string such as "linux/arm64/v8" does not parse
    └── NoDefaultCommand       the image names no command and none was given
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kelpie.images._digest import validate_digest
from kelpie.images._errors import (
    ImageNotFound,
    InvalidDigest,
    InvalidManifest,
    InvalidPlatform,
    NoDefaultCommand,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
"""Media type of an OCI image manifest."""
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
"""Media type of an OCI image index (one manifest per platform)."""
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
"""Media type of an OCI image config blob."""
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
"""Media type of a Docker v2 schema 2 image manifest."""
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
"""Media type of a Docker manifest list (the Docker form of an index)."""
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
"""Media type of a Docker image config blob."""
DOCKER_SCHEMA1_MANIFESTS = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})
"""Docker schema 1 manifests: recognised only to refuse them clearly."""

MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
"""Media types :func:`parse_manifest_document` returns as a :class:`Manifest`."""
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
"""Media types :func:`parse_manifest_document` returns as an :class:`Index`."""
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
"""Media types of image config blobs."""

MAX_DOCUMENT_BYTES = 4 << 20
"""Largest manifest, index or config document parsed (registries cap manifests at 4 MiB)."""

# Content types some servers send instead of the document's own type: decide from the body.
_UNSPECIFIC_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})

_OCI_ARCHITECTURES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
_DEFAULT_VARIANTS = {"arm64": "v8"}
_ARM_VARIANTS = {"armv7l": "v7", "armv6l": "v6"}





@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform: operating system, CPU architecture and optional variant.

    Architectures use OCI names (``amd64``, ``arm64``, ``arm``, ``386``...), not the kernel's
    (``x86_64``, ``aarch64``).
    """

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine as a Linux guest would see it (``linux/amd64``...)."""
        return cls.for_arch(_platform.machine())

    @classmethod
    def for_arch(cls, machine: str) -> Platform:
        """The Linux platform of a machine architecture (``aarch64`` -> ``linux/arm64/v8``)."""
        machine = machine.lower()
        architecture = _OCI_ARCHITECTURES.get(machine, machine)
        variant = _ARM_VARIANTS.get(machine) or _DEFAULT_VARIANTS.get(architecture)
        return cls("linux", architecture, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/architecture[/variant]``; raise :class:`InvalidPlatform` if malformed."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(p.strip() for p in parts):
            raise InvalidPlatform(
                text, "expected 'os/architecture' or 'os/architecture/variant', "
                "e.g. 'linux/amd64' or 'linux/arm64/v8', with no empty part"
            )
        if any(p != p.strip() or p.lower() != p for p in parts):
            raise InvalidPlatform(text, "parts must be lowercase with no spaces")
        variant = parts[2] if len(parts) == 3 else None
        return cls(parts[0], _OCI_ARCHITECTURES.get(parts[1], parts[1]), variant)

    def matches(self, other: Platform) -> bool:
        """Whether ``other`` (an image's platform) satisfies this wanted platform.

        OS and architecture must be equal; the variant only when this one names a variant,
        counting an absent variant as the architecture's default (``arm64`` is ``v8``).
        """
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None:
            return True
        default = _DEFAULT_VARIANTS.get(self.architecture)
        return (other.variant or default) == self.variant

    def __str__(self) -> str:
        tail = f"/{self.variant}" if self.variant else ""
        return f"{self.os}/{self.architecture}{tail}"


def _empty_annotations() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A reference to a blob or manifest: its media type, digest and size (OCI descriptor).

    ``platform`` is set on the entries of an index; ``annotations`` is read-only.
    """

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=_empty_annotations, hash=False)


@dataclass(frozen=True, slots=True)
class Manifest:
    """One image for one platform: its config blob and its layers, bottom layer first."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    media_type: str


@dataclass(frozen=True, slots=True)
class Index:
    """A list of manifests, one per platform (OCI index or Docker manifest list)."""

    manifests: tuple[Descriptor, ...]
    media_type: str


def parse_manifest_document(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or index document.

    The kind comes from ``media_type`` (e.g. a registry's ``Content-Type``) or else the
    document's own ``mediaType``; when both are given they must agree. A document with
    neither is recognised by shape (``manifests`` makes an index, ``config`` a manifest).
    Docker schema 1 and other kinds are refused with :class:`InvalidManifest`.
    """
    document = _load_object(data, "manifest document")
    kind = _document_kind(document, media_type)
    if kind in INDEX_MEDIA_TYPES:
        return _parse_index(document, kind)
    return _parse_manifest(document, kind)


def select_platform(index: Index, wanted: Platform) -> Descriptor:
    """The entry of ``index`` for ``wanted``; :class:`ImageNotFound` lists what exists.

    Entries with no platform are skipped. Among matches an exact variant match wins, then
    the first in index order.
    """
    matches = [d for d in index.manifests if d.platform and wanted.matches(d.platform)]
    if matches:
        exact = [d for d in matches if d.platform and d.platform.variant == wanted.variant]
        return (exact or matches)[0]
    available = sorted({str(d.platform) for d in index.manifests if d.platform})
    listed = ", ".join(available) or "none (no entry declares a platform)"
    raise ImageNotFound(
        f"the image index has no manifest for platform {wanted}; available: {listed}"
    )


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config blob that decide how the image runs.

    ``env`` is ``KEY=VALUE`` strings in order; ``diff_ids`` are the digests of the
    uncompressed layers, bottom first (``rootfs.diff_ids``).
    """

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    architecture: str = ""
    os: str = ""
    variant: str | None = None
    diff_ids: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=_empty_annotations, hash=False)

    @property
    def platform(self) -> Platform:
        """The platform the image was built for."""
        return Platform(self.os, self.architecture, self.variant)

    def command(self, override: Sequence[str] | None = None) -> list[str]:
        """The argv to run, by Docker's rules: ``entrypoint + (override or cmd)``.

        A non-empty ``override`` replaces ``Cmd`` (and keeps ``Entrypoint``). Raises
        :class:`NoDefaultCommand` if the result is empty.
        """
        tail = list(override) if override else list(self.cmd)
        argv = [*self.entrypoint, *tail]
        if not argv:
            raise NoDefaultCommand()
        return argv

    def environment(self) -> dict[str, str]:
        """``env`` as a mapping (a later duplicate key wins, as in a shell)."""
        result: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            result[key] = value
        return result

    def exec_user(self) -> str | None:
        """The user commands run as, or None for the default.

        The agent switches user by name or uid; a ``:group`` part is not supported yet, so
        only the user part of ``User`` is used.
        """
        return self.user.partition(":")[0] or None


def parse_image_config(data: bytes) -> ImageConfig:
    """Parse an image config blob (OCI or Docker); raise :class:`InvalidManifest` if bad."""
    what = "image config"
    document = _load_object(data, what)
    runtime = document.get("config")
    if runtime is None:
        runtime = {}
    if not isinstance(runtime, dict):
        raise InvalidManifest(what, "'config' must be an object")
    rootfs = document.get("rootfs") or {}
    if not isinstance(rootfs, dict):
        raise InvalidManifest(what, "'rootfs' must be an object")
    diff_ids = _string_list(rootfs, "diff_ids", f"{what} rootfs")
    for diff_id in diff_ids:
        _digest(diff_id, f"{what} rootfs.diff_ids")
    return ImageConfig(
        entrypoint=_string_list(runtime, "Entrypoint", what),
        cmd=_string_list(runtime, "Cmd", what),
        env=_env(runtime, what),
        working_dir=_string(runtime, "WorkingDir", what),
        user=_string(runtime, "User", what),
        architecture=_string(document, "architecture", what),
        os=_string(document, "os", what),
        variant=_string(document, "variant", what) or None,
        diff_ids=diff_ids,
        labels=MappingProxyType(_string_map(runtime, "Labels", what)),
    )


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidManifest(what, f"{len(data)} bytes is over the {MAX_DOCUMENT_BYTES} limit")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(what, f"not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise InvalidManifest(what, f"expected a JSON object, got {type(document).__name__}")
    return document


def _document_kind(document: dict[str, Any], media_type: str | None) -> str:
    given = (media_type or "").split(";")[0].strip().lower()
    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidManifest("manifest document", "'mediaType' must be a string")
    if given in _UNSPECIFIC_TYPES:
        given = ""
    if given and declared and given != declared:
        raise InvalidManifest(
            "manifest document",
            f"served as {given!r} but its mediaType says {declared!r}; they must agree",
        )
    kind = given or declared or _kind_from_shape(document)
    if kind in DOCKER_SCHEMA1_MANIFESTS or document.get("schemaVersion") == 1:
        raise InvalidManifest(
            "manifest document",
            "Docker schema 1 manifests are not supported (deprecated, no verifiable config); "
            "ask the registry for schema 2 or OCI, or rebuild and push the image",
        )
    if kind not in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES:
        known = ", ".join(sorted(MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES))
        raise InvalidManifest("manifest document", f"media type {kind!r} is not one of {known}")
    if document.get("schemaVersion") != 2:
        raise InvalidManifest(
            "manifest document", f"schemaVersion is {document.get('schemaVersion')!r}, not 2"
        )
    return kind


def _kind_from_shape(document: dict[str, Any]) -> str:
    if "manifests" in document:
        return OCI_INDEX
    if "config" in document or "layers" in document:
        return OCI_MANIFEST
    return ""


def _parse_manifest(document: dict[str, Any], kind: str) -> Manifest:
    config = document.get("config")
    if not isinstance(config, dict):
        raise InvalidManifest("image manifest", "'config' must be a descriptor object")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest("image manifest", "'layers' must be a list of descriptors")
    return Manifest(
        config=_descriptor(config, "image manifest config"),
        layers=tuple(_descriptor(d, f"image manifest layer {i}") for i, d in enumerate(layers)),
        media_type=kind,
    )


def _parse_index(document: dict[str, Any], kind: str) -> Index:
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidManifest("image index", "'manifests' must be a list of descriptors")
    return Index(
        manifests=tuple(
            _descriptor(d, f"image index entry {i}", with_platform=True)
            for i, d in enumerate(manifests)
        ),
        media_type=kind,
    )


def _descriptor(value: object, what: str, *, with_platform: bool = False) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidManifest(what, "a descriptor must be a JSON object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidManifest(what, "'mediaType' must be a non-empty string")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(what, f"'size' must be a non-negative integer, got {size!r}")
    platform = _platform_of(value.get("platform"), what) if with_platform else None
    return Descriptor(
        media_type=media_type,
        digest=_digest(value.get("digest"), what),
        size=size,
        platform=platform,
        annotations=MappingProxyType(_string_map(value, "annotations", what)),
    )


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidManifest(what, f"'digest' must be a string, got {value!r}")
    try:
        return validate_digest(value)
    except InvalidDigest as exc:
        raise InvalidManifest(what, str(exc)) from exc


def _platform_of(value: object, what: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidManifest(what, "'platform' must be an object")
    os_name, arch = value.get("os"), value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        raise InvalidManifest(what, "'platform' needs string 'os' and 'architecture'")
    variant = value.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise InvalidManifest(what, "'platform.variant' must be a string")
    return Platform(os_name, arch, variant or None)


def _string(document: Mapping[str, Any], key: str, what: str) -> str:
    value = document.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidManifest(what, f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _string_list(document: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = document.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidManifest(what, f"{key!r} must be a list of strings")
    return tuple(value)


def _string_map(document: Mapping[str, Any], key: str, what: str) -> dict[str, str]:
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidManifest(what, f"{key!r} must be an object of string values")
    return dict(value)


def _env(runtime: Mapping[str, Any], what: str) -> tuple[str, ...]:
    env = _string_list(runtime, "Env", what)
    for item in env:
        if "=" not in item or item.startswith("="):
            raise InvalidManifest(what, f"Env entry {item!r} is not KEY=VALUE")
    return env
