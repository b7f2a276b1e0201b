"""apply_layer: what a layer builds, and a malicious-layer corpus that must not escape.

Each malicious case applies its layers to ``<tmp>/box/rootfs`` while a sentinel tree lives
beside it (``<tmp>/outside`` and ``<tmp>/box/sibling``): after the case, the sentinel must be
byte-for-byte, mode-for-mode and link-count-for-link-count what it was before.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard

from fixtures.images.tarbuild import (
    TAR,
    TAR_GZIP,
    TAR_ZSTD,
    Entry,
    directory,
    file,
    gzipped,
    hardlink,
    layer_tar,
    opaque,
    sha256,
    symlink,
    whiteout,
)
from kelpie.images import (
    LayerError,
    LayerLimits,
    UnsafeLayer,
    apply_layer,
)

Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path, skip: Path) -> Snapshot:
    """Every path under ``root`` but ``skip``: type, mode, owner, links, mtime, content."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if Path(dirpath) == skip.parent:
            dirnames.remove(skip.name)
        for name in [*dirnames, *filenames, ""]:
            path = Path(dirpath, name) if name else Path(dirpath)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                body = None
            key = str(path.relative_to(root))
            result[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, body)
    return result


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A rootfs two levels down, with sentinel trees beside it."""
    rootfs = tmp_path / "box" / "rootfs"
    rootfs.mkdir(parents=True)
    for base in (tmp_path / "outside", tmp_path / "box" / "sibling"):
        (base / "dir").mkdir(parents=True)
        (base / "secret").write_text("do not touch\n")
        (base / "dir" / "file1").write_text("one\n")
        (base / "dir" / "file1").chmod(0o640)
        os.symlink("secret", base / "link")
    return rootfs


def sentinels(rootfs: Path) -> Snapshot:
    """Everything in the test's temporary directory except the rootfs itself."""
    return snapshot(rootfs.parent.parent, skip=rootfs)


def apply_all(rootfs: Path, layers: Sequence[Sequence[Entry]], **kw: object) -> None:
    for entries in layers:
        apply_layer(rootfs, io.BytesIO(layer_tar(entries)), media_type=TAR, **kw)  # type: ignore[arg-type]


def outside(rootfs: Path) -> str:
    """The absolute path of the sentinel dir outside the rootfs."""
    return str(rootfs.parent.parent / "outside")


# Each case: a function of the rootfs giving its layers, and the error in strict mode
# (None: the entry is neutralised, resolved inside the rootfs, and the layer applies).
def _abs_path(r: Path) -> list[list[Entry]]:
    return [[file(f"{outside(r)}/secret", "pwned"), file(f"{outside(r)}/evil", "pwned")]]


def _dotdot(r: Path) -> list[list[Entry]]:
    return [[file("../outside/evil", "pwned")]]


def _dotdot_inner(r: Path) -> list[list[Entry]]:
    return [[directory("a"), file("a/../../sibling/secret", "pwned")]]


def _abs_symlink_parent(r: Path) -> list[list[Entry]]:
    return [[symlink("s", outside(r))], [file("s/secret", "pwned"), file("s/dir/file1", "x")]]


def _etc_symlink_parent(r: Path) -> list[list[Entry]]:
    return [[symlink("etc", "/etc")], [file("etc/kelpie-escape-test-passwd", "pwned")]]


def _relative_climb(r: Path) -> list[list[Entry]]:
    return [[symlink("x", "../.."), symlink("y", "../../../../../../../../..")],
            [file("x/evil", "pwned"), directory("x/outside", 0o777), file("y/tmp/evil", "p")]]


def _same_layer_climb(r: Path) -> list[list[Entry]]:
    return [[symlink("x", "../sibling"), file("x/secret", "pwned"), file("x/dir/new", "p")]]


def _symlink_chain(r: Path) -> list[list[Entry]]:
    return [[directory("d"), symlink("d/a", "../b"), symlink("b", "../../outside")],
            [file("d/a/secret", "pwned")]]


def _symlink_loop(r: Path) -> list[list[Entry]]:
    return [[symlink("l1", "l2"), symlink("l2", "l1"), file("l1/evil", "pwned")]]


def _final_symlink_file(r: Path) -> list[list[Entry]]:
    return [[symlink("f", f"{outside(r)}/secret")], [file("f", "replaced", mode=0o4777)]]


def _final_symlink_dir(r: Path) -> list[list[Entry]]:
    return [[symlink("d", outside(r))], [directory("d", 0o777), file("d/secret", "pwned")]]


def _hardlink_abs(r: Path) -> list[list[Entry]]:
    return [[hardlink("hl", f"{outside(r)}/secret")]]


def _hardlink_dotdot(r: Path) -> list[list[Entry]]:
    return [[hardlink("hl", "../sibling/secret")]]


def _hardlink_via_symlink(r: Path) -> list[list[Entry]]:
    return [[symlink("s", outside(r))], [hardlink("hl", "s/secret")]]


def _hardlink_via_climb(r: Path) -> list[list[Entry]]:
    return [[symlink("x", "../../../.."), hardlink("hl", "x/outside/secret")]]


def _hardlink_to_symlink_out(r: Path) -> list[list[Entry]]:
    # Linking to the symlink itself is fine (it stays a link); writing through it is not.
    return [[symlink("s", f"{outside(r)}/secret"), hardlink("hl", "s")],
            [file("hl", "pwned", mode=0o777)]]


def _whiteout_dotdot(r: Path) -> list[list[Entry]]:
    return [[file("../.wh.sibling")]]


def _whiteout_of_dotdot(r: Path) -> list[list[Entry]]:
    return [[directory("a"), file("a/.wh..."), file("a/.wh..")]]


def _whiteout_via_symlink(r: Path) -> list[list[Entry]]:
    return [[symlink("s", outside(r)), symlink("x", "../../..")],
            [whiteout("s/secret"), whiteout("x/outside"), whiteout("s/dir")]]


def _opaque_via_symlink(r: Path) -> list[list[Entry]]:
    return [[symlink("s", outside(r)), symlink("x", "..")],
            [opaque("s"), opaque("s/dir"), opaque("x"), opaque("x/sibling")]]


def _whiteout_symlink_itself(r: Path) -> list[list[Entry]]:
    # Whiting out a symlink to a directory removes the link, not the directory's contents.
    return [[symlink("s", outside(r)), symlink("t", "../sibling/dir")],
            [whiteout("s"), whiteout("t")]]


def _overlay_xattr(r: Path) -> list[list[Entry]]:
    return [[directory("d", xattrs={"trusted.overlay.redirect": "/../../outside"})]]


CASES = {
    "absolute path": (_abs_path, None),
    "dotdot": (_dotdot, UnsafeLayer),
    "dotdot inside a path": (_dotdot_inner, UnsafeLayer),
    "absolute symlink parent": (_abs_symlink_parent, None),
    "etc -> /etc parent (a loop inside the rootfs)": (_etc_symlink_parent, UnsafeLayer),
    "relative climbing symlink parent": (_relative_climb, None),
    "climb and write in one layer": (_same_layer_climb, None),
    "chain of symlinks": (_symlink_chain, None),
    "symlink loop": (_symlink_loop, UnsafeLayer),
    "file over a symlink": (_final_symlink_file, None),
    "dir over a symlink": (_final_symlink_dir, None),
    "hard link to absolute outside path": (_hardlink_abs, UnsafeLayer),
    "hard link with dotdot": (_hardlink_dotdot, UnsafeLayer),
    "hard link through symlinked parent": (_hardlink_via_symlink, UnsafeLayer),
    "hard link through climbing symlink": (_hardlink_via_climb, UnsafeLayer),
    "hard link to a symlink pointing out": (_hardlink_to_symlink_out, None),
    "whiteout with dotdot": (_whiteout_dotdot, UnsafeLayer),
    "whiteout naming dotdot": (_whiteout_of_dotdot, UnsafeLayer),
    "whiteout through symlinks": (_whiteout_via_symlink, None),
    "opaque through symlinks": (_opaque_via_symlink, None),
    "whiteout of a symlink": (_whiteout_symlink_itself, None),
    "overlayfs xattr": (_overlay_xattr, None),
}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_malicious_layer_changes_nothing_outside(box: Path, case: str, strict: bool) -> None:
    build, error = CASES[case]
    before = sentinels(box)
    etc_before = sorted(os.listdir("/etc"))
    layers = build(box)
    if error is not None and strict:
        with pytest.raises(error):
            apply_all(box, layers, strict=strict)
    else:
        apply_all(box, layers, strict=strict)
    assert sentinels(box) == before
    assert sorted(os.listdir("/etc")) == etc_before
    for path in box.rglob("*"):  # and nothing inside points out through a hard link
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_nlink <= 2


def test_neutralised_entries_land_inside(box: Path) -> None:
    apply_all(box, _abs_symlink_parent(box))
    inside = box / outside(box).lstrip("/")
    assert (inside / "secret").read_text() == "pwned"
    assert (inside / "dir" / "file1").read_text() == "x"
    assert os.readlink(box / "s") == outside(box)  # the absolute link is kept as is


def test_climbing_symlink_is_clamped_at_the_rootfs(box: Path) -> None:
    apply_all(box, _relative_climb(box))
    assert (box / "evil").read_text() == "pwned"
    assert (box / "outside").is_dir()
    assert (box / "tmp" / "evil").is_file()
    assert os.readlink(box / "x") == "../.."


def test_file_over_symlink_replaces_the_link(box: Path) -> None:
    apply_all(box, _final_symlink_file(box))
    assert not (box / "f").is_symlink()
    assert (box / "f").read_text() == "replaced"
    assert stat.S_IMODE((box / "f").stat().st_mode) == 0o4777


def test_lenient_mode_skips_only_the_bad_entries(box: Path) -> None:
    layer = [file("good1", "1"), file("../evil", "x"), hardlink("hl", "../sibling/secret"),
             file("a/.wh.."), file("good2", "2")]
    result = apply_layer(box, io.BytesIO(layer_tar(layer)), media_type=TAR, strict=False)
    assert sorted(os.listdir(box)) == ["good1", "good2"]
    assert len(result.skipped) == 3
    assert all("'..'" in s or "names no file" in s for s in result.skipped)


def test_strict_mode_error_names_the_entry(box: Path) -> None:
    with pytest.raises(UnsafeLayer) as info:
        apply_all(box, [[file("ok"), file("x/../../evil")]])
    assert info.value.entry == "x/../../evil"
    assert "'..'" in str(info.value)


# --- decompression bombs and limits --------------------------------------------------------


def test_content_bomb_is_stopped(box: Path) -> None:
    blob = gzipped(layer_tar([file("zeros", b"\0" * (8 << 20))]))
    assert len(blob) < 64 << 10
    with pytest.raises(UnsafeLayer, match="more than 1048576 bytes"):
        apply_layer(box, io.BytesIO(blob), media_type=TAR_GZIP,
                    limits=LayerLimits(max_bytes=1 << 20))
    assert not (box / "zeros").exists() or (box / "zeros").stat().st_size <= 1 << 20


def test_entry_count_bomb_is_stopped(box: Path) -> None:
    blob = gzipped(layer_tar([file(f"f{i}") for i in range(200)]))
    with pytest.raises(UnsafeLayer, match="more than 50 entries"):
        apply_layer(box, io.BytesIO(blob), media_type=TAR_GZIP, limits=LayerLimits(max_entries=50))
    assert len(os.listdir(box)) <= 50


def test_metadata_bomb_is_stopped(box: Path) -> None:
    huge_xattr = {"user.big": "x" * (4 << 20)}
    blob = gzipped(layer_tar([file("f", xattrs=huge_xattr)]))
    limits = LayerLimits(max_bytes=1 << 20, max_metadata_bytes=1 << 20)
    with pytest.raises(UnsafeLayer, match="decompressed layer is larger"):
        apply_layer(box, io.BytesIO(blob), media_type=TAR_GZIP, limits=limits)


def test_stream_trailing_a_bomb_after_the_tar_is_capped(box: Path) -> None:
    tar = layer_tar([file("f", "x")]) + b"\0" * (4 << 20)
    limits = LayerLimits(max_bytes=1 << 20, max_metadata_bytes=1 << 20)
    with pytest.raises(UnsafeLayer, match="decompressed layer is larger"):
        apply_layer(box, io.BytesIO(gzipped(tar)), media_type=TAR_GZIP, limits=limits)


# --- what layers build ----------------------------------------------------------------------

BASIC = [
    directory("bin"),
    file("bin/busybox", b"\x7fELF...", mode=0o755),
    symlink("bin/sh", "/bin/busybox"),
    symlink("bin/ls", "busybox"),
    hardlink("bin/busybox2", "bin/busybox"),
    directory("etc", 0o750),
    file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", uid=0, gid=42),
    file("usr/bin/suid", "s", mode=0o4755),
    directory("ro", 0o555),
    file("ro/inside", "r"),
]


@pytest.mark.parametrize(
    ("media_type", "encode"),
    [
        (TAR, lambda b: b),
        (TAR_GZIP, gzipped),
        (TAR_ZSTD, lambda b: zstandard.ZstdCompressor().compress(b)),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", gzipped),
    ],
)
def test_compressions_build_the_same_tree(
    tmp_path: Path, media_type: str, encode: object
) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    tar = layer_tar(BASIC)
    result = apply_layer(rootfs, io.BytesIO(encode(tar)), media_type=media_type)  # type: ignore[operator]
    assert result.diff_id == sha256(tar)
    assert result.entries == len(BASIC)
    assert result.skipped == []
    check_basic_tree(rootfs)


def check_basic_tree(rootfs: Path) -> None:
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"  # absolute targets kept as links
    assert os.readlink(rootfs / "bin/ls") == "busybox"
    assert (rootfs / "bin/busybox").stat().st_ino == (rootfs / "bin/busybox2").stat().st_ino
    assert stat.S_IMODE((rootfs / "etc").stat().st_mode) == 0o750
    assert stat.S_IMODE((rootfs / "usr/bin/suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((rootfs / "usr").stat().st_mode) == 0o755  # implicit parent
    assert stat.S_IMODE((rootfs / "ro").stat().st_mode) == 0o555
    assert (rootfs / "ro/inside").read_text() == "r"
    assert (rootfs / "etc/passwd").read_text().startswith("root:")
    assert (rootfs / "bin").stat().st_mtime == 1_700_000_000
    if os.geteuid() == 0:
        assert (rootfs / "etc/passwd").stat().st_gid == 42


def test_layer_from_a_path(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(gzipped(layer_tar(BASIC)))
    apply_layer(rootfs, blob, media_type=TAR_GZIP)
    check_basic_tree(rootfs)


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and ownership need root")
def test_root_keeps_devices_owners_and_xattrs(tmp_path: Path) -> None:
    layer = [
        directory("dev"),
        Entry("dev/null", "chr", mode=0o666, device=(1, 3)),
        Entry("dev/loop0", "blk", mode=0o660, device=(7, 0), gid=6),
        Entry("dev/fifo", "fifo", mode=0o600),
        file("home/u/f", "x", uid=1000, gid=1000),
        symlink("home/u/l", "f"),
        file("ping", "p", mode=0o755, xattrs={"user.note": "hello"}),
    ]
    layer[-2].uid = 1000
    apply_all(tmp_path, [layer])
    null = (tmp_path / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISBLK((tmp_path / "dev/loop0").lstat().st_mode)
    assert (tmp_path / "dev/loop0").lstat().st_gid == 6
    assert stat.S_ISFIFO((tmp_path / "dev/fifo").lstat().st_mode)
    assert (tmp_path / "home/u/f").stat().st_uid == 1000
    assert (tmp_path / "home/u/l").lstat().st_uid == 1000
    try:
        assert os.getxattr(tmp_path / "ping", "user.note") == b"hello"
    except OSError as exc:  # tmpfs without user xattrs
        pytest.skip(f"no user xattrs here: {exc}")


def test_unprivileged_skips_devices_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layer = [Entry("null", "chr", mode=0o666, device=(1, 3)), Entry("fifo", "fifo", mode=0o600),
             file("f", "x", uid=1000)]
    with caplog.at_level(logging.WARNING, logger="kelpie.images"):
        result = apply_layer(tmp_path, io.BytesIO(layer_tar(layer)), media_type=TAR,
                             preserve_owner=False)
    assert sorted(os.listdir(tmp_path)) == ["f", "fifo"]
    assert (tmp_path / "f").stat().st_uid == os.geteuid()
    assert result.skipped == ["null: device nodes are created only when running as root"]
    assert "device nodes" in caplog.text


def test_later_layers_replace_and_merge(tmp_path: Path) -> None:
    apply_all(tmp_path, [
        [directory("d", 0o700), file("d/keep", "k"), file("f", "old"), directory("x"),
         file("x/inner"), symlink("l", "f")],
        [directory("d", 0o755), file("d/new", "n"), directory("f"), file("x", "now a file"),
         file("l", "not a link")],
    ])
    assert sorted(os.listdir(tmp_path / "d")) == ["keep", "new"]
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert (tmp_path / "f").is_dir()
    assert (tmp_path / "x").read_text() == "now a file"
    assert (tmp_path / "l").read_text() == "not a link" and not (tmp_path / "l").is_symlink()


def test_whiteouts_apply_to_lower_layers_only(tmp_path: Path) -> None:
    apply_all(tmp_path, [
        [file("a"), file("b"), directory("d"), file("d/lower"), directory("d/sub"),
         file("d/sub/lower"), directory("o"), file("o/lower"), directory("o/sub"),
         file("o/sub/lower")],
        [whiteout("a"), file("b"), whiteout("b"), whiteout("d"), file("d/upper"),
         file("o/before"), opaque("o"), directory("o/sub"), file("o/sub/upper"),
         file("o/after"), whiteout("missing/x"), whiteout("nothing")],
    ])
    assert sorted(os.listdir(tmp_path)) == ["b", "d", "o"]
    assert sorted(os.listdir(tmp_path / "d")) == ["upper"]
    assert sorted(os.listdir(tmp_path / "o")) == ["after", "before", "sub"]
    assert sorted(os.listdir(tmp_path / "o/sub")) == ["upper"]
    assert not (tmp_path / "missing").exists()


def test_hard_link_to_a_lower_layer_file(tmp_path: Path) -> None:
    apply_all(tmp_path, [[file("a", "A")], [hardlink("b", "a"), hardlink("a", "a")]])
    assert (tmp_path / "b").read_text() == "A"
    assert (tmp_path / "a").stat().st_ino == (tmp_path / "b").stat().st_ino


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([hardlink("b", "missing")], "not found"),
        ([directory("d"), hardlink("b", "d")], "hard link to a directory"),
        ([hardlink("b", "/")], "rootfs directory itself"),
    ],
)
def test_bad_hard_links(tmp_path: Path, entries: list[Entry], message: str) -> None:
    with pytest.raises(UnsafeLayer, match=message):
        apply_all(tmp_path, [entries])


def test_file_as_parent_is_a_layer_error(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="not a directory"):
        apply_all(tmp_path, [[file("a"), file("a/b")]])


@pytest.mark.parametrize(
    ("blob", "media_type", "message"),
    [
        (b"not gzip at all", TAR_GZIP, "not a valid"),
        (b"\x28\xb5\x2f\xfd garbage", TAR_ZSTD, "not a valid"),
        (gzipped(layer_tar(BASIC))[:200], TAR_GZIP, "not a valid"),
        (gzipped(layer_tar(BASIC))[:-8] + b"\0" * 8, TAR_GZIP, "CRC check failed"),
        (layer_tar(BASIC), "application/vnd.oci.image.layer.v1.tar+lz4", "unsupported layer"),
    ],
)
def test_corrupt_or_unknown_layers(
    tmp_path: Path, blob: bytes, media_type: str, message: str
) -> None:
    with pytest.raises(LayerError, match=message):
        apply_layer(tmp_path, io.BytesIO(blob), media_type=media_type)
