"""OCI images: references, registries, import, a verified store, and safe root filesystems.

Unpacking an image is a security boundary: every blob is verified against its digest
before use, and layers are applied so that no entry can escape the rootfs directory.

Flow: :class:`RegistryClient` ``.pull`` (or :func:`import_oci_layout` /
:func:`import_docker_archive`) puts verified blobs and the manifest into an
:class:`ImageStore`; :func:`rootfs_dir` / :func:`rootfs_ext4` turn a stored image into a
root filesystem (cached by image digest); :meth:`ImageConfig.command` gives its default
command the way ``docker run`` would.
"""

from kelpie.images._auth import Credentials, RegistryAuth, load_docker_credentials
from kelpie.images._blobs import BlobStore, VerifiedReader
from kelpie.images._digest import sha256_digest, validate_digest
from kelpie.images._dockerfile import (
    Dockerfile,
    DockerfileError,
    Instruction,
    Stage,
    Words,
    arg_pairs,
    key_values,
    parse_dockerfile,
)
from kelpie.images._errors import (
    AmbiguousImage,
    BlobNotFound,
    DigestMismatch,
    ImageError,
    ImageInUse,
    ImageNotFound,
    InvalidDigest,
    InvalidManifest,
    InvalidPlatform,
    InvalidReference,
    LayerError,
    NoDefaultCommand,
    RegistryError,
    UnsafeLayer,
)
from kelpie.images._import import import_docker_archive, import_oci_layout
from kelpie.images._layer import (
    LAYER_MEDIA_TYPES,
    OPAQUE_WHITEOUT,
    WHITEOUT_PREFIX,
    Compression,
    LayerLimits,
    LayerResult,
    apply_layer,
)
from kelpie.images._layer_check import check_layer
from kelpie.images._manifest import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    parse_image_config,
    parse_manifest_document,
    select_platform,
)
from kelpie.images._pull import pull_image, push_image
from kelpie.images._push import PushReport
from kelpie.images._reference import DEFAULT_TAG, DOCKER_HUB, ImageReference
from kelpie.images._registry import BlobProgress, RegistryClient, RetryPolicy
from kelpie.images._rootfs_build import rootfs_dir, rootfs_ext4
from kelpie.images._store import ImageStore, StoredImage, remove_tree

__all__ = [
    "DEFAULT_TAG",
    "DOCKER_HUB",
    "LAYER_MEDIA_TYPES",
    "OPAQUE_WHITEOUT",
    "WHITEOUT_PREFIX",
    "AmbiguousImage",
    "BlobNotFound",
    "BlobProgress",
    "BlobStore",
    "Compression",
    "Credentials",
    "Descriptor",
    "DigestMismatch",
    "Dockerfile",
    "DockerfileError",
    "ImageConfig",
    "ImageError",
    "ImageInUse",
    "ImageNotFound",
    "ImageReference",
    "ImageStore",
    "Index",
    "Instruction",
    "InvalidDigest",
    "InvalidManifest",
    "InvalidPlatform",
    "InvalidReference",
    "LayerError",
    "LayerLimits",
    "LayerResult",
    "Manifest",
    "NoDefaultCommand",
    "Platform",
    "PushReport",
    "RegistryAuth",
    "RegistryClient",
    "RegistryError",
    "RetryPolicy",
    "Stage",
    "StoredImage",
    "UnsafeLayer",
    "VerifiedReader",
    "Words",
    "apply_layer",
    "arg_pairs",
    "check_layer",
    "import_docker_archive",
    "import_oci_layout",
    "key_values",
    "load_docker_credentials",
    "parse_dockerfile",
    "parse_image_config",
    "parse_manifest_document",
    "pull_image",
    "push_image",
    "remove_tree",
    "rootfs_dir",
    "rootfs_ext4",
    "select_platform",
    "sha256_digest",
    "validate_digest",
]
