"""Errors of the image layer, part of Kelpie's one error tree.

Library errors (``zlib``, ``zstandard``, ``tarfile``, ``OSError`` from the store, HTTP from a
registry) are translated into these at the boundary with ``raise ... from exc``.

::

    KelpieError
    └── ImageError                   anything about OCI images, blobs and layers
        ├── InvalidReference         an image reference does not parse (also a ConfigError)
        ├── InvalidDigest            a digest string is malformed (also a ValueError)
        ├── InvalidManifest          a manifest, index or config is malformed/unsupported
        ├── InvalidPlatform          not os/arch[/variant] (also a ConfigError)
        ├── NoDefaultCommand         no Entrypoint/Cmd and no command given (ConfigError)
        ├── ImageNotFound            no such image, tag or manifest
        ├── AmbiguousImage           an id prefix matches several images
        ├── ImageInUse               held or multiply tagged; force overrides
        ├── BlobNotFound             no such blob in the store or layout
        ├── DigestMismatch           content does not match its digest or declared size
        ├── LayerError               a layer cannot be applied (bad compression, bad tar)
        │   └── UnsafeLayer          a layer entry escapes the rootfs or a size limit is hit
        └── RegistryError            a registry refused or failed (.retriable per instance)
"""

from __future__ import annotations

from collections.abc import Sequence

from kelpie._exceptions import ConfigError, KelpieError

SHORT_ID_LENGTH = 12
"""Hex digits of a manifest digest shown as an image's short id."""


class ImageError(KelpieError):
    """Root of every error about OCI images, blobs and layers."""


class InvalidReference(ImageError, ConfigError):
    """An image reference such as ``docker.io/library/alpine:3.19`` does not parse.

    ``text`` is the input; ``problems`` says what was wrong and what is allowed.
    """

    def __init__(self, text: str, problems: Sequence[str]) -> None:
        self.text = text
        super().__init__(problems, what=f"image reference {text!r}")


class InvalidDigest(ImageError, ValueError):
    """A digest string is not ``sha256:`` followed by 64 lowercase hex digits."""

    def __init__(self, digest: str, reason: str) -> None:
        self.digest = digest
        super().__init__(
            f"invalid digest {digest!r}: {reason}; "
            "expected 'sha256:' followed by 64 lowercase hex digits"
        )


class ImageNotFound(ImageError):
    """No image, tag or manifest by that name exists where it was looked for."""


class BlobNotFound(ImageError):
    """A blob is missing from the blob store or image layout."""

    def __init__(self, digest: str, where: str) -> None:
        self.digest = digest
        super().__init__(f"blob {digest} not found in {where}")


class DigestMismatch(ImageError):
    """Content does not hash to the digest (or size) it was declared with.

    The content is untrusted and was not used; fetch it again from a trusted source.
    """

    def __init__(
        self,
        expected: str,
        actual: str | None,
        *,
        expected_size: int | None = None,
        actual_size: int | None = None,
        what: str = "blob",
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.expected_size = expected_size
        self.actual_size = actual_size
        if actual is None:
            detail = f"size is more than the declared {expected_size} bytes"
        elif expected_size is not None and actual_size != expected_size:
            detail = f"size is {actual_size} bytes, declared {expected_size}"
        else:
            detail = f"content hashes to {actual}"
        super().__init__(f"{what} {expected} failed verification: {detail}; it was not used")


class LayerError(ImageError):
    """A layer cannot be applied: unknown media type, corrupt compression or tar stream."""


class UnsafeLayer(LayerError):
    """A layer entry tries to escape the rootfs, or the layer exceeds a size limit.

    ``entry`` names the offending tar entry (empty for whole-layer limits).
    """

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        self.reason = reason
        where = f"entry {entry!r}: " if entry else ""
        super().__init__(f"unsafe layer: {where}{reason}")


class RegistryError(ImageError):
    """A registry refused a request or failed; ``retriable`` says whether to try again."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        self.retriable = retriable
        super().__init__(message)


class InvalidManifest(ImageError, ValueError):
    """A manifest, index or image config document is malformed or of an unsupported kind.

    ``what`` names the document, ``problem`` says what is wrong and what is allowed.
    """

    def __init__(self, what: str, problem: str) -> None:
        self.what = what
        self.problem = problem
        super().__init__(f"invalid {what}: {problem}")


class InvalidPlatform(ImageError, ConfigError):
    """A platform string is not ``os/architecture[/variant]`` (e.g. ``linux/arm64/v8``)."""

    def __init__(self, text: str, problem: str) -> None:
        self.text = text
        super().__init__([problem], what=f"platform {text!r}")


class NoDefaultCommand(ImageError, ConfigError):
    """The image config has neither ``Entrypoint`` nor ``Cmd``, and no command was given."""

    def __init__(self) -> None:
        super().__init__(
            [
                "the image has no default command (its config sets neither Entrypoint nor "
                "Cmd); give the command to run explicitly"
            ],
            what="command",
        )


class AmbiguousImage(ImageError):
    """An id prefix matches more than one stored image; ``matches`` lists their digests."""

    def __init__(self, text: str, matches: list[str]) -> None:
        self.text = text
        self.matches = tuple(matches)
        ids = ", ".join(d.removeprefix("sha256:")[:SHORT_ID_LENGTH] for d in matches)
        super().__init__(
            f"image id prefix {text!r} matches {len(matches)} images ({ids}); "
            "give more hex digits, a tag or the full digest"
        )


class ImageInUse(ImageError):
    """The image cannot be removed: it is held or has several tags (``force`` overrides)."""
