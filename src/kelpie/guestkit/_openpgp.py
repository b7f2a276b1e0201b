"""Checking a Debian archive's signed ``InRelease`` against the archive keyring.

``gpgv`` (Debian's own verifier) where it is installed, else Sequoia's OpenPGP library
(``pysequoia``). Either way only the *signed* text is returned, so nothing outside the
signature can be read as part of the Release file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


class SignatureError(RuntimeError):
    """The data is not signed by a key of the keyring (or cannot be checked)."""


def verify_clearsigned(data: bytes, keyring: Path, *, what: str) -> bytes:
    """The text of the clear-signed ``data`` when a key of ``keyring`` signed it."""
    if shutil.which("gpgv"):
        return _with_gpgv(data, keyring, what)
    return _with_sequoia(data, keyring, what)


def _with_gpgv(data: bytes, keyring: Path, what: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="kelpie-gpgv-") as tmp:
        signed = Path(tmp) / "InRelease"
        signed.write_bytes(data)
        done = subprocess.run(
            ["gpgv", "--quiet", "--keyring", str(keyring), "--output", "-", str(signed)],
            capture_output=True, check=False)
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise SignatureError(f"{what} is not signed by a Debian archive key: "
                             f"{detail[-1] if detail else 'gpgv refused it'}")
    return done.stdout


def _with_sequoia(data: bytes, keyring: Path, what: str) -> bytes:
    try:
        import pysequoia
    except ImportError:
        raise SignatureError(
            f"cannot check the signature of {what}: neither gpgv (Debian: apt-get install "
            f"gpgv) nor pysequoia (pip install pysequoia) is installed") from None
    certs = pysequoia.Cert.split_bytes(keyring.read_bytes())
    try:
        verified = pysequoia.verify(bytes=data, store=lambda _ids: certs)
    except Exception as exc:  # pysequoia raises RuntimeError with a long backtrace
        raise SignatureError(f"{what} is not signed by a Debian archive key: "
                             f"{str(exc).splitlines()[0]}") from None
    if not verified.valid_sigs or verified.bytes is None:
        raise SignatureError(f"{what} carries no valid signature of a Debian archive key")
    return bytes(verified.bytes)
