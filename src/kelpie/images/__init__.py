"""OCI images: references, a verified blob store, and safe layer application.

Unpacking an image is a security boundary: every blob is verified against its digest
before use, and layers are applied so that no entry can escape the rootfs directory.
"""

from kelpie.images._blobs import BlobStore, VerifiedReader
from kelpie.images._digest import sha256_digest, validate_digest
from kelpie.images._errors import (
    BlobNotFound,
    DigestMismatch,
    ImageError,
    ImageNotFound,
    InvalidDigest,
    InvalidReference,
    LayerError,
    RegistryError,
    UnsafeLayer,
)
from kelpie.images._layer import (
    LAYER_MEDIA_TYPES,
    OPAQUE_WHITEOUT,
    WHITEOUT_PREFIX,
    Compression,
    LayerLimits,
    LayerResult,
    apply_layer,
)
from kelpie.images._reference import DEFAULT_REGISTRY, DEFAULT_TAG, ImageReference

__all__ = [
    "DEFAULT_REGISTRY",
    "DEFAULT_TAG",
    "LAYER_MEDIA_TYPES",
    "OPAQUE_WHITEOUT",
    "WHITEOUT_PREFIX",
    "BlobNotFound",
    "BlobStore",
    "Compression",
    "DigestMismatch",
    "ImageError",
    "ImageNotFound",
    "ImageReference",
    "InvalidDigest",
    "InvalidReference",
    "LayerError",
    "LayerLimits",
    "LayerResult",
    "RegistryError",
    "UnsafeLayer",
    "VerifiedReader",
    "apply_layer",
    "sha256_digest",
    "validate_digest",
]
