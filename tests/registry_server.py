"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1, filled by skopeo.

The registry listens on a port the kernel picks (``addr: 127.0.0.1:0``); the port is read
from its log line ``listening on 127.0.0.1:PORT`` and the server is ready once ``/v2/``
answers. Images are pushed with a real client (``skopeo copy``) from OCI layouts built by
:mod:`fixtures.images.tarbuild`, so Kelpie's puller is checked against bytes that
neither it nor its authors produced by hand.

Kept free of Kelpie imports on purpose, like the layout builder.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fixtures.images import tarbuild
from waiting import wait_for

REGISTRY_BINARY = "docker-registry"
SKOPEO = "skopeo"
HTPASSWD = "htpasswd"
_LISTENING = re.compile(rb"listening on ((?:\d+\.){3}\d+:\d+)")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def missing_tools(*, auth: bool = False) -> list[str]:
    """The tools these helpers need that are not installed (empty when all are)."""
    wanted = [REGISTRY_BINARY, SKOPEO] + ([HTPASSWD] if auth else [])
    return [tool for tool in wanted if shutil.which(tool) is None]


@dataclass
class RunningRegistry:
    """A registry process, its address (``127.0.0.1:PORT``) and its storage directory."""

    address: str
    storage: Path
    process: subprocess.Popen[bytes]
    credentials: tuple[str, str] | None = None

    def push(self, layout: Path, tag: str, name: str, *, all_platforms: bool = False) -> None:
        """Copy ``layout:tag`` to ``ADDRESS/name:tag`` with skopeo (``--all`` for an index)."""
        command = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false"]
        if all_platforms:
            command.append("--all")
        if self.credentials is not None:
            command.append("--dest-creds=" + ":".join(self.credentials))
        command += [f"oci:{layout}:{tag}", f"docker://{self.address}/{name}:{tag}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"skopeo push failed: {result.stderr.strip()}")

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps the bytes of blob ``digest`` (distribution's layout)."""
        hex_digest = digest.removeprefix("sha256:")
        return (
            self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hex_digest[:2] / hex_digest / "data"
        )

    def stop(self) -> None:
        """Terminate the registry and wait for it."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(
    workdir: Path, *, credentials: tuple[str, str] | None = None, timeout: float = 20.0,
    host: str = "127.0.0.1",
) -> RunningRegistry:
    """Start ``docker-registry`` under ``workdir`` on ``host`` (an address of this
    machine); with ``credentials``, behind htpasswd."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    config = [
        "version: 0.1",
        "log:",
        "  level: info",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "http:",
        f"  addr: {host}:0",
        "  secret: kelpie-tests",
    ]
    if credentials is not None:
        htpasswd = workdir / "htpasswd"
        _write_htpasswd(htpasswd, *credentials)
        config += ["auth:", "  htpasswd:", "    realm: kelpie-tests", f"    path: {htpasswd}"]
    (workdir / "config.yml").write_text("\n".join(config) + "\n")
    log_path = workdir / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(workdir / "config.yml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        address = _wait_for_address(process, log_path, timeout)
        _wait_for_api(process, address, timeout)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return RunningRegistry(address, storage, process, credentials)


def _write_htpasswd(path: Path, username: str, password: str) -> None:
    result = subprocess.run(
        [HTPASSWD, "-Bbn", username, password],
        capture_output=True, text=True, timeout=30, check=True,
    )
    path.write_text(result.stdout)


def _wait_for_address(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """Poll the registry's log for its ``listening on`` line (up to ``timeout`` seconds)."""
    def listening() -> str | None:
        match = _LISTENING.search(log.read_bytes())
        if match:
            return match.group(1).decode()
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text(errors='replace')}")
        return None

    return wait_for(listening, timeout, "docker-registry to log the address it listens on")


def _wait_for_api(process: subprocess.Popen[bytes], address: str, timeout: float) -> None:
    """Poll ``GET /v2/`` until it answers (200, or 401 behind auth), up to ``timeout``."""
    url = f"http://{address}/v2/"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return True
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError("docker-registry exited before answering /v2/")
        return False

    wait_for(answers, timeout, f"docker-registry at {address} to answer GET /v2/")


def write_multiarch_layout(
    root: Path, images: dict[tuple[str, str], Sequence[tarbuild.Entry]], *, tag: str
) -> None:
    """Write an OCI layout whose ``tag`` is an image index over one image per platform.

    ``images`` maps ``(os, architecture)`` to the entries of that platform's single layer.
    """
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = tarbuild.sha256(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    entries = []
    for (os_name, arch), layer_entries in images.items():
        tar = tarbuild.layer_tar(layer_entries)
        layer = put(tarbuild.gzipped(tar), tarbuild.TAR_GZIP)
        config = put(json.dumps({
            "architecture": arch,
            "os": os_name,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [tarbuild.sha256(tar)]},
        }).encode(), OCI_CONFIG)
        manifest = put(json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer],
        }).encode(), OCI_MANIFEST)
        entries.append({**manifest, "platform": {"os": os_name, "architecture": arch}})
    inner = put(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries,
    }).encode(), OCI_INDEX)
    outer = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**inner, "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (root / "index.json").write_text(json.dumps(outer))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
