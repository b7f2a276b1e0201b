"""Debian packages fetched over HTTP from the Debian archive, every step verified; no apt.

The chain of trust is the archive's own: ``dists/SUITE/InRelease`` is signed by a key of the
Debian archive keyring (kept beside this module as data); its ``SHA256`` list vouches for
``main/binary-ARCH/Packages.xz``; each package's stanza there vouches for its ``.deb``.
Plain HTTP is therefore enough (as apt uses it). Verified indexes and ``.deb`` files are
cached by their sha256, so a second build downloads nothing it already has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import httpx
from debian.debian_support import Version

from kelpie.guestkit._openpgp import SignatureError, verify_clearsigned

KEYRING = Path(__file__).with_name("debian-archive-keyring.gpg")
"""The Debian archive keyring (from Debian's debian-archive-keyring 2023.3+deb12u2)."""
MIRROR_ENV = "KELPIE_DEBIAN_MIRROR"
"""Replaces ``http://deb.debian.org`` in every source (a local mirror or a proxy)."""
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class ArchiveError(RuntimeError):
    """A download failed, or what arrived does not match what the signed chain vouches for."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One suite of a Debian archive: ``http://deb.debian.org/debian`` + ``bookworm``."""

    name: str
    url: str
    suite: str
    component: str = "main"

    def resolved_url(self, environ: Mapping[str, str] = os.environ) -> str:
        mirror = environ.get(MIRROR_ENV)
        if mirror and self.url.startswith("http://deb.debian.org"):
            return mirror.rstrip("/") + self.url.removeprefix("http://deb.debian.org")
        return self.url


@dataclasses.dataclass(frozen=True)
class Package:
    """One binary package version, as a Packages index (or the kit's lock) describes it."""

    name: str
    version: str
    sha256: str
    size: int = dataclasses.field(default=0, compare=False)
    filename: str = dataclasses.field(default="", compare=False)
    """Its path below the archive's URL (``pool/main/...``)."""
    source: str = dataclasses.field(default="", compare=False)
    """The name of the :class:`Source` it comes from."""
    depends: str = dataclasses.field(default="", compare=False)

    @property
    def deb_name(self) -> str:
        """The file name used for this package in the download cache."""
        safe_version = self.version.replace(":", "%3a")
        return f"{self.name}_{safe_version}_{self.sha256[:16]}.deb"


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """The paragraphs of a deb822 file (Release, Packages) as dicts of their first lines;
    continuation lines are kept (joined by newlines) for multi-line fields."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line.startswith((" ", "\t")):
            if key:
                current[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DebianArchive:
    """The signed indexes and packages of some :class:`Source` suites for one architecture."""

    def __init__(self, sources: Iterable[Source], arch: str, cache_dir: Path, *,
                 keyring: Path = KEYRING, client: httpx.Client | None = None,
                 progress: Callable[[str], None] = lambda _m: None) -> None:
        self.sources = {s.name: s for s in sources}
        self.arch = arch
        self.cache_dir = cache_dir
        self.keyring = keyring
        self._client = client or httpx.Client(timeout=TIMEOUT, follow_redirects=True)
        self._progress = progress
        self._indexes: dict[str, dict[str, list[Package]]] = {}

    def close(self) -> None:
        self._client.close()

    # ---- the signed chain ---------------------------------------------------------------
    def _get(self, url: str) -> bytes:
        try:
            reply = self._client.get(url)
        except httpx.HTTPError as exc:
            raise ArchiveError(f"cannot download {url}: {exc}") from exc
        if reply.status_code == 404:
            raise FileNotFoundError(url)
        if reply.status_code != 200:
            raise ArchiveError(f"cannot download {url}: HTTP {reply.status_code}")
        return reply.content

    def _release_hashes(self, source: Source) -> dict[str, tuple[str, int]]:
        """``path -> (sha256, size)`` from the suite's InRelease, its signature checked."""
        url = f"{source.resolved_url()}/dists/{source.suite}/InRelease"
        try:
            signed = self._get(url)
        except FileNotFoundError:
            raise ArchiveError(f"{url} does not exist: is {source.suite!r} a suite of "
                               f"{source.url}?") from None
        try:
            text = verify_clearsigned(signed, self.keyring, what=url).decode()
        except SignatureError as exc:
            raise ArchiveError(str(exc)) from exc
        release = parse_stanzas(text)[0] if text.strip() else {}
        if release.get("Codename") != source.suite and release.get("Suite") != source.suite:
            raise ArchiveError(f"{url} describes suite {release.get('Suite')!r} "
                               f"({release.get('Codename')!r}), not {source.suite!r}")
        hashes: dict[str, tuple[str, int]] = {}
        for line in release.get("SHA256", "").splitlines():
            parts = line.split()
            if len(parts) == 3:
                hashes[parts[2]] = (parts[0], int(parts[1]))
        return hashes

    def index(self, source_name: str) -> dict[str, list[Package]]:
        """The suite's Packages index for this architecture, by package name (verified)."""
        if source_name in self._indexes:
            return self._indexes[source_name]
        source = self.sources[source_name]
        path = f"{source.component}/binary-{self.arch}/Packages.xz"
        hashes = self._release_hashes(source)
        if path not in hashes:
            raise ArchiveError(f"the Release file of {source.url} {source.suite} lists no "
                               f"{path} (is {self.arch!r} an architecture of the suite?)")
        sha256, size = hashes[path]
        cached = self.cache_dir / "indexes" / f"{sha256}.xz"
        if not cached.exists() or sha256_file(cached) != sha256:
            self._progress(f"downloading the {source.suite} package index ({self.arch})")
            data = self._get(f"{source.resolved_url()}/dists/{source.suite}/{path}")
            _check(data, sha256, size, f"{source.suite}/{path}")
            _write(cached, data)
        packages: dict[str, list[Package]] = {}
        for stanza in parse_stanzas(lzma.decompress(cached.read_bytes()).decode()):
            if "Package" in stanza and "SHA256" in stanza and "Filename" in stanza:
                package = Package(stanza["Package"], stanza["Version"], stanza["SHA256"],
                                  int(stanza.get("Size", "0")), stanza["Filename"],
                                  source_name, stanza.get("Depends", ""))
                packages.setdefault(package.name, []).append(package)
        self._indexes[source_name] = packages
        return packages

    def candidate(self, name: str) -> Package:
        """The newest version of ``name`` in any of the sources (what apt would pick)."""
        found = [p for source in self.sources for p in self.index(source).get(name, [])]
        if not found:
            raise ArchiveError(f"package {name!r} is in none of "
                               f"{', '.join(s.suite for s in self.sources.values())} "
                               f"for {self.arch}")
        return max(found, key=lambda p: Version(p.version))

    def vouched(self, package: Package) -> Package | None:
        """``package`` as the signed index of its source lists it now; None when that
        version is gone from the archive (Debian keeps only the current one)."""
        for listed in self.index(package.source).get(package.name, []):
            if listed.version == package.version and listed.sha256 == package.sha256:
                return listed
        return None

    # ---- packages -----------------------------------------------------------------------
    def download(self, package: Package, debs_dir: Path) -> Path:
        """The package's ``.deb`` in ``debs_dir`` (downloaded once), its sha256 checked."""
        final = debs_dir / package.deb_name
        if final.exists() and sha256_file(final) == package.sha256:
            return final
        source = self.sources[package.source]
        self._progress(f"downloading {package.name} {package.version} ({self.arch})")
        data = self._get(f"{source.resolved_url()}/{package.filename}")
        _check(data, package.sha256, package.size or None, package.filename)
        _write(final, data)
        return final


def _check(data: bytes, sha256: str, size: int | None, what: str) -> None:
    if size is not None and len(data) != size:
        raise ArchiveError(f"{what}: {len(data)} bytes arrived, the signed index says {size}")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ArchiveError(f"{what}: sha256 {actual}, the signed index says {sha256} "
                           f"(a corrupt or tampered download)")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".partial-", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)
