#!/usr/bin/env python3
"""Write a tiny OCI image layout (static busybox + /etc files) for the demo.

    python3 scripts/demo-image.py DIR

No registry is needed: `kelpie image import DIR --reference kelpie/demo:latest` stores it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

APPLETS = ("sh", "echo", "cat", "ls", "uname", "hostname", "id", "env", "pwd", "head", "wc",
           "true", "false", "sleep", "mkdir", "rm", "touch", "stty", "printf", "grep", "sed",
           "tr", "cp", "mv", "test", "seq", "dd", "kill", "tty", "nc", "wget", "stat")


def layer() -> bytes:
    busybox = shutil.which("busybox")
    if busybox is None:
        sys.exit("busybox not found: apt-get install busybox-static")
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "etc", "root", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        release = b'PRETTY_NAME="Kelpie demo image (busybox)"\n'
        info = tarfile.TarInfo("etc/os-release")
        info.size, info.mode = len(release), 0o644
        tar.addfile(info, io.BytesIO(release))
    return data.getvalue()


def main(root: Path) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    tar = layer()
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["cat", "/etc/os-release"],
                   "WorkingDir": "/root"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
    }
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [put(gzip.compress(tar, mtime=0),
                       "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    entry = put(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    entry["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
