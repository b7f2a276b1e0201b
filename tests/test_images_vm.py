"""Stored images booted as real VMs: busybox image -> ext4 root disk -> QEMU guest.

The image is built by the test's own tar fixture from the host's static busybox, stored,
turned into an ext4 disk and booted; its default command and an override run inside it
with the image's environment, working directory and user. The real-VM tests fail instead
of skipping when qemu is in KELPIE_REQUIRE_BACKENDS (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import real_part_missing
from fixtures.images.tarbuild import Entry, directory, file, symlink
from kelpie import VmConfig
from kelpie.cli import main
from kelpie.guestkit import GuestKit
from kelpie.images._rootfs_build import rootfs_ext4
from kelpie.images._store import ImageStore, StoredImage
from kelpie.vm import DEFAULT_DISK_MIB
from test_images_store import put_image

APPLETS = ("sh", "echo", "cat", "id", "pwd", "env", "ls")
TAG = "example.com/kelpie/busybox:1"
DEFAULT_CMD = ["sh", "-c", 'echo "$GREETING from $(pwd) as $(id -u)"; cat /srv/greeting']


def busybox_layers() -> list[list[Entry]]:
    """Layer 1: static busybox with applet links and a user database; layer 2: app data."""
    busybox = shutil.which("busybox")
    if busybox is None:
        real_part_missing("busybox-static is not installed (apt-get install busybox-static)")
    assert busybox is not None
    base = [
        directory("bin"),
        file("bin/busybox", Path(busybox).read_bytes(), mode=0o755),
        *(symlink(f"bin/{name}", "busybox") for name in APPLETS),
        directory("etc"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv:/bin/sh\n"),
        file("etc/group", "root:x:0:\napp:x:1000:\n"),
    ]
    app = [directory("srv", uid=1000, gid=1000), file("srv/greeting", "from the image\n")]
    return [base, app]


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short state directory (unix socket paths live in it) used as KELPIE_STATE_DIR."""
    path = Path(f"/tmp/kelpie-img-{os.getpid()}")
    path.mkdir(exist_ok=True)
    monkeypatch.setenv("KELPIE_STATE_DIR", str(path))
    yield path
    main(["--no-autostart", "daemon", "stop", "--stop-sandboxes"])  # if a command started it
    subprocess.run(["rm", "-rf", str(path)], check=False)


def store_busybox(store: ImageStore) -> StoredImage:
    return put_image(
        store,
        busybox_layers(),
        tag=TAG,
        runtime={
            "Cmd": DEFAULT_CMD,
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/srv",
            "User": "app",
        },
    )


def test_run_image_with_mock_backend(state: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The CLI resolves the image, builds its disk and runs its command (mock: no VM)."""
    put_image(ImageStore(), [[file("a")]], tag="example.com/x:1",
              runtime={"Cmd": ["echo", "from-image"], "Env": ["A=1"]})
    assert main(["run", "--rm", "--backend", "mock", "example.com/x:1"]) == 0
    assert capfd.readouterr().out == "from-image\n"
    assert main(["run", "--rm", "--backend", "mock", "echo"]) == 0  # not an image: a command
    assert capfd.readouterr().out == "\n"
    assert main(["run", "--rm", "--backend", "mock", "example.com/x:1", "env"]) == 0
    assert "A=1" in capfd.readouterr().out.splitlines()
    assert main(["run", "--rm", "--backend", "mock", "-e", "A=2", "example.com/x:1", "--",
                 "env"]) == 0
    assert "A=2" in capfd.readouterr().out.splitlines()
    store = ImageStore()
    image = store.resolve("example.com/x:1")
    assert store.ext4_cache(image.digest, DEFAULT_DISK_MIB).is_file()  # the default disk
    assert store.holders(image.digest) == ()  # released when the sandboxes were removed
    assert main(["run", "--name", "kept", "--backend", "mock", "example.com/x:1"]) == 0
    assert len(store.holders(image.digest)) == 1  # a stopped sandbox still holds its image
    assert main(["rm", "kept"]) == 0
    assert store.holders(image.digest) == ()


def test_run_image_without_command_is_a_clear_error(
    state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    put_image(ImageStore(), [[file("a")]], tag="example.com/x:1")
    assert main(["run", "--backend", "mock", "example.com/x:1", "--"]) == 2
    assert "no default command" in capfd.readouterr().err
    assert main(["run", "--pull", "never", "--backend", "mock", "example.com/nosuch:1",
                 "true"]) == 125
    assert "no image 'example.com/nosuch:1'" in capfd.readouterr().err


@pytest.mark.vm
@pytest.mark.timeout(300)
async def test_busybox_image_boots_and_runs(guestkit: GuestKit, state: Path) -> None:
    from kelpie.backends.qemu._vm import QemuVm

    store = ImageStore()
    image = store_busybox(store)
    disk = rootfs_ext4(store, image)
    vm = QemuVm(VmConfig(root_disk=disk, image=TAG), kit=guestkit)
    vm.workdir = state / "vms" / vm.id
    config = image.config
    user = config.user
    await vm.start()
    try:
        default = await vm.exec(
            config.command(None), env=config.environment(), cwd=config.working_dir, user=user
        )
        assert default.exit_code == 0, default.stderr
        assert default.stdout == b"hello from /srv as 1000\nfrom the image\n"
        override = await vm.exec(
            config.command(["cat", "/etc/hosts"]), env=config.environment(), user=user
        )
        assert override.exit_code == 0, override.stderr
        assert b"localhost" in override.stdout
        wrote = await vm.exec(["sh", "-c", "echo x > /tmp/t && ls -ld /tmp /srv"])
        assert wrote.exit_code == 0, wrote.stderr
        assert b"drwxrwxrwt" in wrote.stdout
        assert b" 1000 " in wrote.stdout or b" app " in wrote.stdout  # owner kept in ext4
    finally:
        await vm.stop()


@pytest.mark.vm
@pytest.mark.timeout(300)
def test_kelpie_run_boots_the_image(
    guestkit: GuestKit, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    store_busybox(ImageStore())
    assert main(["run", "--backend", "qemu", TAG]) == 0
    assert capfd.readouterr().out == "hello from /srv as 1000\nfrom the image\n"
    assert main(["run", "--backend", "qemu", "-e", "GREETING=hi", TAG, "--", "sh", "-c",
                 "echo $GREETING; exit 3"]) == 3
    assert capfd.readouterr().out == "hi\n"
