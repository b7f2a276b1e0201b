"""Helpers shared by real-VM tests: short state directories and busybox root disks."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from conftest import real_part_missing

BASE_APPLETS = ("sh", "cat", "echo", "ls", "mkdir", "hostname", "sleep", "head", "od", "date",
                "kill", "mv", "ln", "readlink", "mkfifo", "mknod", "chmod", "touch", "test",
                "sync")


def short_state_dir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp named for this process (unix socket paths live in it, and
    they are limited to 107 bytes), removed afterwards. Use from a fixture."""
    path = Path(f"/tmp/kelpie-{prefix}-{os.getpid()}")
    path.mkdir(exist_ok=True)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def busybox_root_disk(where: Path, applets: Iterable[str] = BASE_APPLETS) -> Path:
    """A small ext4 root filesystem with static busybox, like an image's disk."""
    tree = where / "rootfs"
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
        (tree / d).mkdir(parents=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        real_part_missing("busybox-static is not installed (scripts/setup installs it)")
    assert busybox is not None
    shutil.copy(busybox, tree / "bin" / "busybox")
    for applet in applets:
        (tree / "bin" / applet).symlink_to("busybox")
    image = where / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(image), "32M"],
                   check=True)
    return image
