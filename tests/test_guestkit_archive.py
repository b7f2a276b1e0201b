"""The guest kit's Debian archive client against a small signed archive served on loopback.

The archive is made here like Debian makes its own: a ``.deb`` in the pool, a
``Packages.xz`` naming its sha256, a ``Release`` naming the index's sha256, clear-signed
into ``InRelease`` with a key of the test's own keyring (``gpg``). Each link of the chain
is then tampered with, and each tampering must be refused; both verifiers (gpgv and
Sequoia) are run.
"""

from __future__ import annotations

import hashlib
import http.server
import lzma
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie.guestkit import _openpgp
from kelpie.guestkit._archive import ArchiveError, DebianArchive, Package, Source
from kelpie.guestkit._lock import KitLock, Locked, read_lock, vouched_packages, write_lock

SUITE = "kelpie-test"
DEB = b"!<arch>\nnot really a package, but bytes whose sha256 the index vouches for\n"


class Archive:
    """Files served over HTTP by path, changeable while served."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, bytes] = {}

    def release(self, packages_xz: bytes) -> bytes:
        digest = hashlib.sha256(packages_xz).hexdigest()
        return (f"Origin: Kelpie\nSuite: {SUITE}\nCodename: {SUITE}\nArchitectures: amd64\n"
                f"SHA256:\n {digest} {len(packages_xz)} main/binary-amd64/Packages.xz\n"
                ).encode()

    def sign(self, text: bytes, home: Path) -> bytes:
        (self.root / "Release").write_bytes(text)
        out = self.root / "InRelease"
        out.unlink(missing_ok=True)
        subprocess.run(["gpg", "--batch", "--homedir", str(home), "--clearsign", "--output",
                        str(out), str(self.root / "Release")], check=True, capture_output=True)
        return out.read_bytes()


def _key(home: Path, name: str) -> Path:
    home.mkdir(mode=0o700)
    subprocess.run(["gpg", "--batch", "--homedir", str(home), "--passphrase", "",
                    "--quick-gen-key", f"{name} <{name}@example.invalid>", "ed25519", "sign",
                    "never"], check=True, capture_output=True)
    keyring = home / "keyring.gpg"
    keyring.write_bytes(subprocess.run(["gpg", "--batch", "--homedir", str(home), "--export"],
                                       check=True, capture_output=True).stdout)
    return keyring


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Archive, str, Path, Path]]:
    """(archive, its URL, the trusted keyring, another key's gpg home)."""
    if shutil.which("gpg") is None:
        pytest.fail("gpg is needed to sign the test archive (Debian: apt-get install gnupg)")
    root = tmp_path_factory.mktemp("archive")
    trusted_home, other_home = root / "trusted", root / "other"
    keyring = _key(trusted_home, "archive")
    _key(other_home, "intruder")
    archive = Archive(root)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = archive.files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    archive.home = trusted_home  # type: ignore[attr-defined]
    yield archive, f"http://127.0.0.1:{server.server_port}/debian", keyring, other_home
    server.shutdown()


def publish(archive: Archive, deb: bytes = DEB, *, version: str = "1.0") -> bytes:
    """Put a consistent, signed archive in place; return its Packages.xz."""
    stanza = (f"Package: hello\nVersion: {version}\nArchitecture: amd64\n"
              f"Filename: pool/main/h/hello_{version}.deb\nSize: {len(deb)}\n"
              f"SHA256: {hashlib.sha256(deb).hexdigest()}\n\n").encode()
    packages = lzma.compress(stanza)
    archive.files = {
        f"/debian/pool/main/h/hello_{version}.deb": deb,
        f"/debian/dists/{SUITE}/main/binary-amd64/Packages.xz": packages,
        f"/debian/dists/{SUITE}/InRelease": archive.sign(archive.release(packages),
                                                          archive.home),  # type: ignore[attr-defined]
    }
    return packages


def client(url: str, keyring: Path, cache: Path) -> DebianArchive:
    return DebianArchive([Source("test", url, SUITE)], "amd64", cache, keyring=keyring)


@pytest.fixture(params=["gpgv", "sequoia"])
def verifier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sequoia":  # a host without gpgv
        monkeypatch.setattr(_openpgp.shutil, "which", lambda name: None)
    return str(request.param)


def test_a_consistent_archive_delivers_the_package(served: tuple[Archive, str, Path, Path],
                                                   verifier: str, tmp_path: Path) -> None:
    archive, url, keyring, _ = served
    publish(archive)
    found = client(url, keyring, tmp_path).candidate("hello")
    assert (found.version, found.source) == ("1.0", "test")
    deb = client(url, keyring, tmp_path).download(found, tmp_path / "debs")
    assert deb.read_bytes() == DEB


def test_a_tampered_deb_is_refused(served: tuple[Archive, str, Path, Path], verifier: str,
                                   tmp_path: Path) -> None:
    archive, url, keyring, _ = served
    publish(archive)
    archive.files["/debian/pool/main/h/hello_1.0.deb"] = DEB.replace(b"bytes", b"BYTES")
    debian = client(url, keyring, tmp_path)
    with pytest.raises(ArchiveError, match=r"sha256 .* the signed index says"):
        debian.download(debian.candidate("hello"), tmp_path / "debs")
    assert not (tmp_path / "debs").exists() or not any((tmp_path / "debs").iterdir())


def test_a_tampered_packages_index_is_refused(served: tuple[Archive, str, Path, Path],
                                              verifier: str, tmp_path: Path) -> None:
    archive, url, keyring, _ = served
    publish(archive)
    path = f"/debian/dists/{SUITE}/main/binary-amd64/Packages.xz"
    archive.files[path] = lzma.compress(b"Package: hello\nVersion: 6.6.6\nFilename: evil.deb\n"
                                        b"SHA256: " + b"0" * 64 + b"\n\n")
    with pytest.raises(ArchiveError, match=r"Packages\.xz"):
        client(url, keyring, tmp_path).candidate("hello")


def test_a_tampered_or_foreign_release_is_refused(served: tuple[Archive, str, Path, Path],
                                                  verifier: str, tmp_path: Path) -> None:
    archive, url, keyring, other_home = served
    packages = publish(archive)
    path = f"/debian/dists/{SUITE}/InRelease"
    signed = archive.files[path]
    archive.files[path] = signed.replace(b"Origin: Kelpie", b"Origin: Evil!")
    with pytest.raises(ArchiveError, match="not signed by a Debian archive key"):
        client(url, keyring, tmp_path).candidate("hello")
    archive.files[path] = archive.sign(archive.release(packages), other_home)
    with pytest.raises(ArchiveError, match="not signed by a Debian archive key"):
        client(url, keyring, tmp_path).candidate("hello")


def test_a_locked_version_gone_from_the_archive_is_replaced_and_said(
        served: tuple[Archive, str, Path, Path], tmp_path: Path) -> None:
    archive, url, keyring, _ = served
    publish(archive, version="2.0")
    old = Package("hello", "1.0", hashlib.sha256(DEB).hexdigest(), len(DEB),
                  "pool/main/h/hello_1.0.deb", "test")
    lock = KitLock((Source("test", url, SUITE),), {"amd64": (Locked("hello", old),)})
    write_lock(lock, tmp_path / "kit.lock.json")
    assert read_lock(tmp_path / "kit.lock.json") == lock
    said: list[str] = []
    (now,) = vouched_packages(lock, client(url, keyring, tmp_path), said.append)
    assert now.version == "2.0"
    assert said == ["hello 1.0 (locked) is gone from the archive; using hello 2.0, verified "
                    "the same way (`kelpie guestkit lock --refresh` records it)"]


def test_the_shipped_lock_names_both_architectures() -> None:
    lock = read_lock()
    for arch in ("amd64", "arm64"):
        names = [item.package.name for item in lock.packages(arch)]
        assert names[0].startswith("linux-image-") and names[0].endswith(f"-{arch}")
        assert "busybox-static" in names and "python3.11-minimal" in names
    with pytest.raises(ArchiveError, match="no packages for riscv64"):
        lock.packages("riscv64")
