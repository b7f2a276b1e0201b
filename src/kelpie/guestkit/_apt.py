"""Debian packages as build inputs: resolve versions with apt-cache, fetch with apt-get download.

Nothing is installed on the host. Versions and SHA256 sums come from the apt index, so the
kit's digest is known before anything is downloaded (a cached kit is found without network
access), and every downloaded `.deb` is checked against that sum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


class AptError(RuntimeError):
    """An apt tool is missing, a package is unknown, or a download failed or is corrupt."""


@dataclasses.dataclass(frozen=True)
class Package:
    """One binary package version as the apt index describes it."""

    name: str
    version: str
    sha256: str
    depends: str = dataclasses.field(default="", compare=False)

    @property
    def deb_name(self) -> str:
        """The file name used for this package in the download cache."""
        safe_version = self.version.replace(":", "%3a")
        return f"{self.name}_{safe_version}_{self.sha256[:16]}.deb"


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise AptError(
            f"{argv[0]} is not installed; building the guest kit needs a Debian-based host "
            "with apt and dpkg"
        ) from exc


def _parse_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
        elif not line.startswith((" ", "\t")):
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def show(names: Sequence[str]) -> dict[str, Package]:
    """The candidate version (what `apt-get install` would pick) of each named package.

    One apt-cache call for all names: each call costs about half a second.
    """
    done = _run(["apt-cache", "show", "--no-all-versions", *names])
    found: dict[str, Package] = {}
    for stanza in _parse_stanzas(done.stdout):
        name = stanza.get("Package", "")
        if name in names and "SHA256" in stanza and name not in found:
            found[name] = Package(
                name, stanza["Version"], stanza["SHA256"], stanza.get("Depends", "")
            )
    missing = [name for name in names if name not in found]
    if missing:
        detail = done.stderr.strip() or "no downloadable version in the apt index"
        raise AptError(
            f"package {', '.join(missing)} cannot be resolved ({detail}); "
            "run `apt-get update` and check that the package exists for this architecture"
        )
    return found


def index_fingerprint() -> str:
    """A cheap fingerprint of the apt state `show` reads: file names, sizes and times.

    When it is unchanged, so are the candidate versions, and apt-cache need not run again.
    """
    paths = [Path("/var/lib/dpkg/status")]
    for directory in ("/var/lib/apt/lists", "/etc/apt/preferences.d", "/etc/apt/sources.list.d"):
        if os.path.isdir(directory):
            paths += sorted(Path(directory).iterdir())
    paths += [Path("/etc/apt/preferences"), Path("/etc/apt/sources.list")]
    digest = hashlib.sha256()
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            continue
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolve_versioned_dependency(meta: Package, pattern: str) -> Package:
    """The package `meta` (a metapackage) depends on whose name matches `pattern`.

    Used for `linux-image-amd64` -> `linux-image-6.1.0-NN-amd64`.
    """
    for alternative in re.split(r"[,|]", meta.depends):
        name = alternative.strip().split(" ", 1)[0]
        if re.fullmatch(pattern, name):
            return show([name])[name]
    raise AptError(
        f"package {meta.name} {meta.version} does not depend on a package matching "
        f"{pattern!r} (its Depends: {meta.depends or 'nothing'})"
    )


def sha256_file(path: Path) -> str:
    """Hex SHA256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    packages: Iterable[Package], debs_dir: Path, progress: Callable[[str], None]
) -> dict[Package, Path]:
    """Fetch each package into `debs_dir` (once; later calls reuse the verified file)."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[Package, Path] = {}
    for package in packages:
        final = debs_dir / package.deb_name
        if not final.exists() or sha256_file(final) != package.sha256:
            progress(f"downloading {package.name} {package.version}")
            _download_one(package, final)
        paths[package] = final
    return paths


def _download_one(package: Package, final: Path) -> None:
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".download-") as tmp:
        # apt drops privileges to _apt for downloads; it cannot write to our private dir.
        os.chmod(tmp, 0o755)
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        done = _run(
            ["apt-get", *sandbox, "download", f"{package.name}={package.version}"], cwd=Path(tmp)
        )
        files = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or len(files) != 1:
            detail = done.stderr.strip() or done.stdout.strip()
            raise AptError(f"apt-get download {package.name}={package.version} failed: {detail}")
        actual = sha256_file(files[0])
        if actual != package.sha256:
            raise AptError(
                f"downloaded {package.name} {package.version} has SHA256 {actual}, "
                f"but the apt index says {package.sha256}; run `apt-get update` and retry"
            )
        os.replace(files[0], final)


def unpack(deb: Path, destination: Path) -> None:
    """Extract a `.deb`'s files into `destination` (no maintainer scripts run)."""
    done = _run(["dpkg-deb", "-x", str(deb), str(destination)])
    if done.returncode != 0:
        raise AptError(f"dpkg-deb -x {deb.name} failed: {done.stderr.strip()}")


def require_tools() -> None:
    """Fail early, with one clear message, when apt-get or dpkg-deb are missing."""
    missing = [tool for tool in ("apt-cache", "apt-get", "dpkg-deb") if not shutil.which(tool)]
    if missing:
        raise AptError(
            f"{', '.join(missing)} not found; building the guest kit needs a Debian-based "
            "host with apt and dpkg"
        )
