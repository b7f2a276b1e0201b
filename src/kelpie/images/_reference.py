"""Image references: ``[registry[:port]/]repository[:tag][@digest]``, Docker Hub defaults.

The grammar is the one registries and clients share (distribution's ``reference`` grammar):
a repository is ``/``-separated lowercase components of ``[a-z0-9]`` runs joined by ``.``,
``_``, ``__`` or runs of ``-``; a tag is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``. The first
component is a registry only if it contains ``.`` or ``:`` or is ``localhost`` (or has
uppercase letters, which repositories may not); otherwise the image is on Docker Hub, and a
single-component Docker Hub name lives under ``library/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kelpie.images._errors import InvalidReference

DOCKER_HUB = "docker.io"
"""The registry of a reference that names none (Docker Hub)."""

DEFAULT_TAG = "latest"
"""The tag of a reference that names neither tag nor digest."""

MAX_NAME_LENGTH = 255
"""Longest ``registry/repository`` allowed."""

_LEGACY_HUB_NAMES = frozenset({"index.docker.io", "registry-1.docker.io"})
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGESTS = {"sha256": 64, "sha512": 128}

_REPO_RULE = (
    "each '/'-separated part must be lowercase letters and digits, optionally joined by "
    "'.', '_', '__' or '-' (not at the start or end)"
)
_TAG_RULE = "a tag is 1-128 of A-Z a-z 0-9 _ . - and must not start with '.' or '-'"


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed, normalised image reference.

    ``str(ref)`` is the fully qualified form, e.g. ``docker.io/library/alpine:latest``.
    A reference with a digest and no tag keeps ``tag=None``; one with neither gets
    ``latest``.
    """

    registry: str
    repository: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse ``text``; raise :class:`InvalidReference` saying what is wrong and allowed."""
        if not isinstance(text, str):
            raise InvalidReference(repr(text), [f"expected a str, got {type(text).__name__}"])
        problems: list[str] = []
        rest, digest = _split_digest(text, problems)
        rest, tag = _split_tag(rest, problems)
        registry, repository = _split_registry(rest, problems)
        if not problems and len(f"{registry}/{repository}") > MAX_NAME_LENGTH:
            problems.append(f"the name is longer than {MAX_NAME_LENGTH} characters")
        if problems:
            raise InvalidReference(text, problems)
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar(self) -> str:
        """The short form people type: ``alpine:latest``, ``user/app:1``, ``quay.io/x/y:z``."""
        name = self.name
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
        return name + self._suffix()

    def _suffix(self) -> str:
        tag = f":{self.tag}" if self.tag is not None else ""
        digest = f"@{self.digest}" if self.digest is not None else ""
        return tag + digest

    def __str__(self) -> str:
        return self.name + self._suffix()


def _split_digest(text: str, problems: list[str]) -> tuple[str, str | None]:
    rest, at, digest = text.partition("@")
    if not at:
        return text, None
    algorithm, colon, encoded = digest.partition(":")
    expected = _DIGESTS.get(algorithm)
    if not colon or expected is None:
        problems.append(
            f"digest {digest!r} must be 'sha256:' + 64 hex digits (or 'sha512:' + 128)"
        )
    elif len(encoded) != expected or not re.fullmatch(r"[0-9a-f]+", encoded):
        problems.append(
            f"digest {digest!r}: the {algorithm} hex part must be exactly {expected} "
            "lowercase hex digits (0-9, a-f)"
        )
    return rest, digest


def _split_tag(text: str, problems: list[str]) -> tuple[str, str | None]:
    colon = text.rfind(":")
    if colon == -1 or "/" in text[colon:]:
        return text, None  # a ':' before the last '/' is a registry port, not a tag
    name, tag = text[:colon], text[colon + 1 :]
    if not _TAG.fullmatch(tag):
        problems.append(f"tag {tag!r} is not allowed: {_TAG_RULE}")
    return name, tag


def _split_registry(text: str, problems: list[str]) -> tuple[str, str]:
    if not text:
        problems.append("the repository name is empty")
        return DOCKER_HUB, ""
    first, slash, remainder = text.partition("/")
    if slash and _looks_like_registry(first):
        _check_registry(first, problems)
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, text
    if registry in _LEGACY_HUB_NAMES:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    _check_repository(repository, problems)
    return registry, repository


def _looks_like_registry(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first.lower() != first


def _check_registry(registry: str, problems: list[str]) -> None:
    host, port = registry, None
    if not registry.endswith("]") and ":" in registry:  # "[::1]" has no port, "[::1]:5" has
        host, _, port = registry.rpartition(":")
    if not _HOST.fullmatch(host):
        problems.append(
            f"registry {registry!r}: the host must be DNS labels of letters, digits and "
            "'-' joined by '.', or a bracketed IPv6 address"
        )
    if port is not None and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        problems.append(f"registry {registry!r}: the port must be a number from 1 to 65535")


def _check_repository(repository: str, problems: list[str]) -> None:
    if not repository:
        problems.append("the repository name is empty")
        return
    if repository.lower() != repository:
        problems.append(f"repository {repository!r} must be lowercase")
        return
    for part in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(part):
            shown = part or "(empty)"
            problems.append(f"repository part {shown!r} is not allowed: {_REPO_RULE}")
            return
