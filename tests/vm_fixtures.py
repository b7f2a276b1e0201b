"""Helpers shared by real-VM tests: short state directories and busybox root disks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

from conftest import real_part_missing
from daemon_env import KelpieHome
from kelpie.guestkit import GuestKit
from kelpie.images import ImageStore, import_oci_layout
from kelpie.runtime import Runtime

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


def kelpie_state_dir(prefix: str) -> Iterator[Path]:
    """:func:`short_state_dir`, also ``KELPIE_STATE_DIR`` meanwhile (where the QEMU backend
    makes its VM directories). Use from a fixture."""
    saved = os.environ.get("KELPIE_STATE_DIR")
    for path in short_state_dir(prefix):
        os.environ["KELPIE_STATE_DIR"] = str(path)
        try:
            yield path
        finally:
            if saved is None:
                os.environ.pop("KELPIE_STATE_DIR", None)
            else:
                os.environ["KELPIE_STATE_DIR"] = saved


def demo_home() -> Iterator[KelpieHome]:
    """An isolated Kelpie installation holding the demo image; its daemon starts with the
    first command and stops at the end. Use from a fixture (``yield from``)."""
    from test_cli_e2e import DEMO, DEMO_IMAGE_SCRIPT

    if shutil.which("busybox") is None:
        real_part_missing("busybox is not installed (the demo image needs it)")
    home = KelpieHome()
    try:
        layout = home.root / "demo-layout"
        subprocess.run([sys.executable, str(DEMO_IMAGE_SCRIPT), str(layout)], check=True,
                       timeout=60)
        imported = home.kelpie("image", "import", str(layout), "--reference",
                               f"{DEMO}:latest")
        assert imported.returncode == 0, imported.stderr
        yield home
    finally:
        home.close()


def demo_image_store(state_dir: Path) -> ImageStore:
    """An image store in ``state_dir`` holding the demo image (busybox, with a disk)."""
    from test_cli_e2e import DEMO, DEMO_IMAGE_SCRIPT

    if shutil.which("busybox") is None:
        real_part_missing("busybox is not installed (the demo image needs it)")
    store = ImageStore(state_dir / "images")
    layout = state_dir / "demo-layout"
    subprocess.run([sys.executable, str(DEMO_IMAGE_SCRIPT), str(layout)], check=True,
                   timeout=60)
    import_oci_layout(layout, store, reference=f"{DEMO}:latest")
    return store


@contextlib.asynccontextmanager
async def qemu_runtime(state_dir: Path, store: ImageStore,
                       guestkit: GuestKit) -> AsyncIterator[Runtime]:
    """A runtime over ``state_dir`` and ``store`` with QEMU on ``guestkit``; it removes its
    sandboxes at the end (a runtime that closes leaves VMs running, as a daemon restart
    wants)."""
    async with Runtime(data_dir=state_dir, images=store,
                       backend_options={"qemu": {"kit": guestkit}}) as rt:
        try:
            yield rt
        finally:
            for info in await rt.list_sandboxes(all=True):
                await rt.remove(info.id, force=True)
