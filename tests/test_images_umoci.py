"""apply_layer against ``umoci unpack``: the same image must give the same rootfs.

The image (whiteouts, opaque directories, replacements, hard and soft links, odd modes) is
written as an OCI image layout by the test's own fixture code; umoci, an independent
implementation, unpacks it; Kelpie applies the same layers; the trees are compared file by
file: type, mode, owner, content, link target, and which paths share an inode.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

from conftest import real_part_missing
from fixtures.images.tarbuild import (
    TAR,
    Entry,
    directory,
    file,
    hardlink,
    layer_tar,
    opaque,
    symlink,
    whiteout,
    write_oci_layout,
)
from kelpie.images import apply_layer

UMOCI = shutil.which("umoci")

LAYERS: list[list[Entry]] = [
    [
        directory("etc"), file("etc/a", "a"), file("etc/b", "b"), directory("etc/sub"),
        file("etc/sub/x", "x"),
        directory("opt"), file("opt/keep", "k"), directory("opt/o"), file("opt/o/1", "1"),
        file("opt/o/2", "2"), directory("opt/o/deep"), file("opt/o/deep/z", "z"),
        directory("bin"), file("bin/busybox", "BB", mode=0o755), symlink("bin/sh", "busybox"),
        symlink("bin/abs", "/bin/busybox"), hardlink("bin/bb2", "bin/busybox"),
        directory("var/lib", 0o700), file("var/lib/data", "d", mode=0o600, uid=1000, gid=1000),
        directory("replace"), directory("replace/dir"), file("replace/dir/inner", "i"),
        file("replace/file", "f"),
        file("usr/bin/suid", "s", mode=0o4755), directory("tmp", 0o1777),
        symlink("dangling", "/no/such/target"),
        file("multi/a", "a"), hardlink("multi/b", "multi/a"),
    ],
    [
        whiteout("etc/a"), whiteout("etc/sub"), file("etc/sub2/new", "n"),
        file("opt/o/before", "before"), opaque("opt/o"), file("opt/o/3", "3"),
        directory("opt/o/deep"), file("opt/o/deep/new", "new"),
        whiteout("bin/sh"), symlink("bin/sh", "/bin/bash"),
        file("replace/dir", "now a file"), directory("replace/file"), file("replace/file/c", "c"),
        hardlink("etc/b2", "etc/b"), directory("etc", 0o700),
        file("var/lib/data", "changed", mode=0o640, uid=1000, gid=1000),
        whiteout("multi/a"),
    ],
    [
        whiteout("etc/a"), whiteout("nothing/here"), directory("new"), opaque("new"),
        file("new/x", "x"), whiteout("bin/bb2"), whiteout("dangling"), symlink("dangling", "bin"),
        directory("tmp", 0o1777), file("tmp/.keep", ""), opaque("replace/file"),
    ],
]


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under ``root``: (type+mode, uid, gid, content hash or link target)."""
    tree: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                body = None
            tree[str(path.relative_to(root))] = (oct(st.st_mode), st.st_uid, st.st_gid, body)
    return tree


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    """Sets of paths that share an inode (only the groups with more than one path)."""
    groups: dict[int, set[str]] = {}
    for path in root.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            groups.setdefault(st.st_ino, set()).add(str(path.relative_to(root)))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_same_rootfs_as_umoci(tmp_path: Path) -> None:
    if UMOCI is None:
        real_part_missing("umoci is not installed (apt-get install umoci)")
    layout = tmp_path / "layout"
    write_oci_layout(layout, LAYERS, tag="test")
    bundle = tmp_path / "bundle"
    command = [str(UMOCI), "unpack", "--image", f"{layout}:test", str(bundle)]
    if os.geteuid() != 0:
        command.insert(2, "--rootless")
    subprocess.run(command, check=True, capture_output=True, timeout=120)

    ours = tmp_path / "ours"
    ours.mkdir()
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    for layer in manifest["layers"]:
        apply_layer(ours, blobs / layer["digest"][7:], media_type=layer["mediaType"])

    theirs = describe(bundle / "rootfs")
    mine = describe(ours)
    assert sorted(mine) == sorted(theirs)
    for path in sorted(theirs):
        assert (path, mine[path]) == (path, theirs[path])
    assert hardlink_groups(ours) == hardlink_groups(bundle / "rootfs")
    assert hardlink_groups(ours)  # the corpus does exercise hard links


def test_expected_tree_without_umoci(tmp_path: Path) -> None:
    """The same corpus against a tree written down by hand (runs even without umoci)."""
    for entries in LAYERS:
        apply_layer(tmp_path, io.BytesIO(layer_tar(entries)), media_type=TAR)
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert listing == sorted([
        "bin", "bin/abs", "bin/busybox", "bin/sh", "dangling",
        "etc", "etc/b", "etc/b2", "etc/sub2", "etc/sub2/new",
        "multi", "multi/b", "new", "new/x",
        "opt", "opt/keep", "opt/o", "opt/o/3", "opt/o/before", "opt/o/deep", "opt/o/deep/new",
        "replace", "replace/dir", "replace/file",  # replace/file/c: hidden by the opaque
        "tmp", "tmp/.keep", "usr", "usr/bin", "usr/bin/suid", "var", "var/lib", "var/lib/data",
    ])
    assert os.readlink(tmp_path / "bin/sh") == "/bin/bash"
    assert os.readlink(tmp_path / "dangling") == "bin"
    assert (tmp_path / "etc/b").stat().st_ino == (tmp_path / "etc/b2").stat().st_ino
    assert stat.S_IMODE((tmp_path / "etc").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "tmp").stat().st_mode) == 0o1777
    assert (tmp_path / "replace/dir").read_text() == "now a file"
    assert (tmp_path / "var/lib/data").read_text() == "changed"
    assert (tmp_path / "multi/b").read_text() == "a"
