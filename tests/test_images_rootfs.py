"""Root filesystems from stored images: the unpacked directory and the ext4 disk image.

The ext4 image is inspected with e2fsprogs' ``debugfs`` (no mount needed) and checked with
``e2fsck -fn``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import real_part_missing
from fixtures.images.tarbuild import directory, file, opaque, whiteout
from kelpie.images import DigestMismatch, ImageError
from kelpie.images._rootfs_build import (
    BuildProgress,
    ensure_essentials,
    measure_tree,
    rootfs_dir,
    rootfs_ext4,
)
from kelpie.images._store import ImageStore
from test_images_store import put_image

LAYERS = [
    [
        directory("etc"), file("etc/motd", "hello\n"), file("etc/gone", "x"),
        directory("usr/lib"), file("usr/lib/old", "old"),
        file("bin/tool", "#!/bin/sh\n", mode=0o755, uid=1000, gid=1000),
    ],
    [whiteout("etc/gone"), opaque("usr/lib"), file("usr/lib/new", "new")],
]


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def _debugfs(image: Path, request: str) -> str:
    tool = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
    if tool is None:
        real_part_missing("debugfs (e2fsprogs) is not installed")
    assert tool is not None
    done = subprocess.run(
        [tool, "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return done.stdout


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_layers_applied_in_order_with_essentials(store: ImageStore) -> None:
    image = put_image(store, LAYERS)
    steps: list[BuildProgress] = []
    root = rootfs_dir(store, image, progress=steps.append)
    assert root == store.rootfs_cache(image.digest)
    assert (root / "etc/motd").read_text() == "hello\n"
    assert not (root / "etc/gone").exists()
    assert sorted(os.listdir(root / "usr/lib")) == ["new"]
    assert stat.S_IMODE((root / "bin/tool").stat().st_mode) == 0o755
    if os.geteuid() == 0:
        assert (root / "bin/tool").stat().st_uid == 1000
    assert "localhost" in (root / "etc/hosts").read_text()
    assert (root / "etc/resolv.conf").is_file()
    for name, mode in [("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755),
                       ("root", 0o700)]:
        assert stat.S_IMODE((root / name).lstat().st_mode) == mode, name
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert [(s.stage, s.current, s.total) for s in steps] == [
        ("layer", 0, 2), ("layer", 1, 2), ("layer", 2, 2), ("rootfs", 1, 1)
    ]
    assert steps[0].detail == image.manifest.layers[0].digest


def test_rootfs_is_cached(store: ImageStore) -> None:
    image = put_image(store, LAYERS)
    first = rootfs_dir(store, image)
    (first / "marker").write_text("kept")
    steps: list[BuildProgress] = []
    assert rootfs_dir(store, image, progress=steps.append) == first
    assert (first / "marker").exists()
    assert [s.stage for s in steps] == ["cached"]


def test_existing_entries_and_symlinks_are_left_alone(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("custom\n")
    (root / "etc/resolv.conf").symlink_to("../run/resolv.conf")
    (root / "tmp").mkdir(mode=0o700)
    ensure_essentials(root)
    assert (root / "etc/hosts").read_text() == "custom\n"
    assert os.readlink(root / "etc/resolv.conf") == "../run/resolv.conf"
    assert not (root / "run").exists()
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o700


def test_etc_symlink_cannot_lead_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").symlink_to("../../../../../../" + str(outside).lstrip("/"))
    ensure_essentials(root)
    assert list(outside.iterdir()) == []
    # the link was followed as the guest would see it: inside the rootfs
    resolved = root / str(outside).lstrip("/")
    assert (resolved / "hosts").is_file()


def test_diff_id_mismatch_discards_the_build(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]], diff_ids=["sha256:" + "0" * 64])
    with pytest.raises(DigestMismatch, match="diff_ids"):
        rootfs_dir(store, image)
    assert not store.rootfs_cache(image.digest).exists()
    assert [p.suffix for p in store.build_dir.iterdir()] == [".lock"]


def test_layer_corrupted_after_add_is_refused(store: ImageStore) -> None:
    image = put_image(store, [[file("a", "content " * 100)]], gzip_layers=False)
    path = store.blobs.path(image.manifest.layers[0].digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # tar padding: the layer still applies, only the digest can tell
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="stored blob"):
        rootfs_dir(store, image)
    assert not store.rootfs_cache(image.digest).exists()


def test_measure_tree_counts_blocks_and_inodes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"x" * 5000)
    os.link(tmp_path / "d/f", tmp_path / "d/g")
    (tmp_path / "l").symlink_to("d/f")
    size, inodes = measure_tree(tmp_path)
    assert inodes == 4  # root, d, f (g is the same inode), l
    assert size == 4096 + 4096 + 8192 + 4096


def test_ext4_image_contents(store: ImageStore) -> None:
    image = put_image(store, LAYERS)
    steps: list[BuildProgress] = []
    disk = rootfs_ext4(store, image, progress=steps.append)
    assert disk == store.ext4_cache(image.digest)
    assert stat.S_IMODE(disk.stat().st_mode) == 0o444
    assert disk.stat().st_size >= 64 << 20
    assert ("ext4", 1, 1) in [(s.stage, s.current, s.total) for s in steps]
    listing = _debugfs(disk, "ls -l /")
    for name in ("etc", "usr", "bin", "tmp", "proc", "sys", "dev", "root"):
        assert f" {name}" in listing, listing
    assert _debugfs(disk, "cat /etc/motd") == "hello\n"
    assert "gone" not in _debugfs(disk, "ls -l /etc")
    assert "old" not in _debugfs(disk, "ls -l /usr/lib")
    tool = _debugfs(disk, "stat /bin/tool")
    if os.geteuid() == 0:
        assert "User:  1000" in tool and "Group:  1000" in tool, tool
    assert "Mode:  0755" in tool
    assert "Mode:  01777" in _debugfs(disk, "stat /tmp")
    assert "Mode:  0755" in _debugfs(disk, "stat /")
    e2fsck = shutil.which("e2fsck") or shutil.which("e2fsck", path="/usr/sbin:/sbin")
    assert e2fsck is not None
    subprocess.run([e2fsck, "-fn", str(disk)], capture_output=True, check=True)
    assert rootfs_ext4(store, image) == disk  # cached


def test_ext4_of_a_chosen_size_is_sparse_checked_and_cached_apart(store: ImageStore) -> None:
    image = put_image(store, LAYERS)
    small = rootfs_ext4(store, image)
    disk = rootfs_ext4(store, image, size_mib=2048)
    assert disk == store.ext4_cache(image.digest, 2048) != small
    assert disk.stat().st_size == 2048 << 20
    assert disk.stat().st_blocks * 512 < 16 << 20  # free space and inode tables unwritten
    stats = _debugfs(disk, "stats")
    assert "Block count:              524288" in stats, stats
    assert _debugfs(disk, "cat /etc/motd") == "hello\n"
    e2fsck = shutil.which("e2fsck") or shutil.which("e2fsck", path="/usr/sbin:/sbin")
    assert e2fsck is not None
    subprocess.run([e2fsck, "-fn", str(disk)], capture_output=True, check=True)
    assert set(store.ext4_caches(image.digest)) == {small, disk}
    with pytest.raises(ImageError, match=r"needs a disk of at least \d+ MiB.*asked for 64 MiB"):
        rootfs_ext4(store, image, size_mib=64)
    store.remove(image.digest)
    assert not small.exists() and not disk.exists()  # every size goes with its image


def test_ext4_is_reproducible_in_its_identity(store: ImageStore, tmp_path: Path) -> None:
    image = put_image(store, [[file("a")]])
    disk = rootfs_ext4(store, image)
    uuid_line = next(x for x in _debugfs(disk, "stats").splitlines() if "UUID" in x)
    other = ImageStore(tmp_path / "second")
    again = rootfs_ext4(other, put_image(other, [[file("a")]]))
    assert uuid_line in _debugfs(again, "stats")
