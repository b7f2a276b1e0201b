"""The image E2B's SDK needs of a sandbox, built from this host: busybox for the usual
commands, the host's bash (the SDK runs every command as ``/bin/bash -l -c``) with the
libraries it links, and E2B's default user ``user`` (uid 1000, home /home/user)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from fixtures.images.tarbuild import Entry, directory, file, symlink, write_oci_layout

APPLETS = ("sh", "echo", "cat", "ls", "id", "env", "pwd", "head", "true", "false", "sleep",
           "mkdir", "rm", "touch", "printf", "grep", "mv", "cp", "test", "dirname", "whoami",
           "kill", "ps", "chmod", "stat", "wc", "seq", "stty")
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "user:x:1000:1000:E2B's default user:/home/user:/bin/bash\n")
GROUP = "root:x:0:\nuser:x:1000:\n"


def _shared_libraries(binary: str) -> list[Path]:
    """The libraries ``binary`` links, as ldd names them (the dynamic loader too)."""
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    return [Path(p) for p in re.findall(r"(/\S+) \(0x", out)]


def _parents(path: str, seen: set[str]) -> list[Entry]:
    entries = []
    parts = path.strip("/").split("/")[:-1]
    for i in range(len(parts)):
        name = "/".join(parts[:i + 1])
        if name not in seen:
            seen.add(name)
            entries.append(directory(name))
    return entries


def write_e2b_image(root: Path) -> None:
    """Write the image as an OCI layout at ``root``."""
    busybox, bash = shutil.which("busybox"), shutil.which("bash")
    if busybox is None or bash is None:
        raise FileNotFoundError("the E2B test image needs busybox and bash on this host")
    seen = {"bin", "etc", "root", "tmp", "home", "home/user"}
    entries: list[Entry] = [
        directory("bin"), directory("etc"), directory("root", 0o700),
        directory("tmp", 0o1777), directory("home"),
        directory("home/user", 0o755, uid=1000, gid=1000),
        file("bin/busybox", Path(busybox).read_bytes(), 0o755),
        file("bin/bash", Path(bash).read_bytes(), 0o755),
        file("etc/passwd", PASSWD), file("etc/group", GROUP),
    ]
    entries += [symlink(f"bin/{applet}", "busybox") for applet in APPLETS]
    for library in _shared_libraries(bash):
        entries += _parents(str(library), seen)
        entries.append(file(str(library).lstrip("/"), library.resolve().read_bytes(), 0o755))
    write_oci_layout(root, [entries])
