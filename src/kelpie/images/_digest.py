"""Digest strings: validation before any use as a path, and computing them."""

from __future__ import annotations

import hashlib
import re

from kelpie.images._errors import InvalidDigest

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def validate_digest(digest: str) -> str:
    """Return ``digest`` unchanged if it is ``sha256:`` + 64 lowercase hex, else raise.

    Only this exact form is ever turned into a file name, so a digest can never carry
    ``/``, ``..`` or any other path syntax into the blob store.
    """
    if not isinstance(digest, str):
        raise InvalidDigest(repr(digest), f"a digest is a str, not {type(digest).__name__}")
    if _SHA256.fullmatch(digest):
        return digest
    algorithm, sep, encoded = digest.partition(":")
    if not sep:
        reason = "no ':' between algorithm and hex"
    elif algorithm != "sha256":
        reason = f"algorithm {algorithm!r} is not supported"
    elif len(encoded) != 64:
        reason = f"hex part has {len(encoded)} characters, not 64"
    else:
        reason = "hex part has characters other than 0-9 and a-f"
    raise InvalidDigest(digest, reason)


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
