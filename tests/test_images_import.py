"""Importing OCI image layouts (directory and tar) and ``docker save`` archives.

Layouts are written by the independent builder in ``fixtures/images/tarbuild.py``; the
docker-save archives here are assembled by hand in Docker's format.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fixtures.images import tarbuild
from kelpie.images import BlobNotFound, DigestMismatch, ImageNotFound
from kelpie.images._import import import_docker_archive, import_oci_layout
from kelpie.images._manifest import DOCKER_MANIFEST, Platform
from kelpie.images._store import ImageStore
from registry_server import write_multiarch_layout

LAYERS = [
    [tarbuild.directory("etc"), tarbuild.file("etc/os-release", "ID=kelpie\n")],
    [tarbuild.file("bin/tool", "#!/bin/sh\necho hi\n", mode=0o755)],
]


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    root = tmp_path / "layout"
    tarbuild.write_oci_layout(root, LAYERS, tag="v1")
    return root


def _layout_manifest(root: Path) -> dict[str, Any]:
    index = json.loads((root / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest: dict[str, Any] = json.loads((root / "blobs" / "sha256" / digest).read_bytes())
    return manifest


def _tar_directory(source: Path, target: Path, *, compress: bool) -> Path:
    with tarfile.open(target, "w:gz" if compress else "w") as tar:
        tar.add(source, arcname=".")
    return target


def test_import_layout_directory_with_reference(layout: Path, store: ImageStore) -> None:
    (image,) = import_oci_layout(layout, store, reference="example.com/team/app:v1")
    assert image.tags == ("example.com/team/app:v1",)
    layers = _layout_manifest(layout)["layers"]
    assert [d.digest for d in image.manifest.layers] == [d["digest"] for d in layers]
    for descriptor in (image.manifest.config, *image.manifest.layers):
        store.blobs.verify(descriptor.digest)
    assert store.resolve("example.com/team/app:v1").digest == image.digest


def test_bare_tag_annotation_imports_untagged(layout: Path, store: ImageStore) -> None:
    (image,) = import_oci_layout(layout, store)
    assert image.tags == ()
    assert store.get(image.digest).digest == image.digest


@pytest.mark.parametrize("compress", [False, True])
def test_import_layout_tar(
    layout: Path, store: ImageStore, tmp_path: Path, compress: bool
) -> None:
    archive = _tar_directory(layout, tmp_path / "layout.tar", compress=compress)
    (from_tar,) = import_oci_layout(archive, store, reference="localhost/app:v1")
    (from_dir,) = import_oci_layout(layout, ImageStore(tmp_path / "other"))
    assert from_tar.digest == from_dir.digest
    assert from_tar.tags == ("localhost/app:v1",)


def test_tampered_layout_blob_is_refused(layout: Path, store: ImageStore) -> None:
    layer = _layout_manifest(layout)["layers"][-1]["digest"]
    blob = layout / "blobs" / "sha256" / layer.removeprefix("sha256:")
    data = blob.read_bytes()
    blob.write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(DigestMismatch):
        import_oci_layout(layout, store, reference="localhost/app:v1")
    assert not store.blobs.has(layer)
    assert store.list() == []


def test_missing_layout_blob(layout: Path, store: ImageStore) -> None:
    layer = _layout_manifest(layout)["layers"][0]["digest"]
    (layout / "blobs" / "sha256" / layer.removeprefix("sha256:")).unlink()
    with pytest.raises(BlobNotFound):
        import_oci_layout(layout, store)


def test_layout_with_index_picks_platform(tmp_path: Path, store: ImageStore) -> None:
    root = tmp_path / "multi"
    write_multiarch_layout(root, {
        ("linux", "amd64"): [tarbuild.file("arch", "amd64")],
        ("linux", "arm64"): [tarbuild.file("arch", "arm64")],
    }, tag="multi")
    (arm,) = import_oci_layout(root, store, reference="localhost/multi:arm",
                               platform=Platform.parse("linux/arm64"))
    assert arm.config.architecture == "arm64"
    with pytest.raises(ImageNotFound, match="linux/riscv64"):
        import_oci_layout(root, store, platform=Platform.parse("linux/riscv64"))


def test_layout_several_images_needs_a_matching_name(tmp_path: Path, store: ImageStore) -> None:
    root = tmp_path / "two"
    tarbuild.write_oci_layout(root, LAYERS[:1], tag="one")
    first = json.loads((root / "index.json").read_text())["manifests"]
    tarbuild.write_oci_layout(root, LAYERS, tag="two")
    index = json.loads((root / "index.json").read_text())
    index["manifests"] = first + index["manifests"]
    (root / "index.json").write_text(json.dumps(index))
    (two,) = import_oci_layout(root, store, reference="localhost/app:two")
    assert len(two.manifest.layers) == 2
    with pytest.raises(ImageNotFound, match="none is named 'three'"):
        import_oci_layout(root, store, reference="localhost/app:three")
    assert len(import_oci_layout(root, store)) == 2


# -- docker save ---------------------------------------------------------------------


def _docker_archive(path: Path, *, corrupt_layer: bool = False) -> tuple[Path, list[str]]:
    """A ``docker save`` style tar; the second image layer repeats the first as a symlink."""
    layer_tars = [tarbuild.layer_tar(entries) for entries in LAYERS]
    diff_ids = [tarbuild.sha256(t) for t in layer_tars] + [tarbuild.sha256(layer_tars[0])]
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()
    config_name = tarbuild.sha256(config).removeprefix("sha256:") + ".json"
    manifest = [{
        "Config": config_name,
        "RepoTags": ["example.com/app:1", "example.com/app:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }]
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(config_name, config)
        add("aaa/layer.tar", layer_tars[0])
        second = layer_tars[1][:-1] + b"x" if corrupt_layer else layer_tars[1]
        add("bbb/layer.tar", second)
        link = tarfile.TarInfo("ccc/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../aaa/layer.tar"
        tar.addfile(link)
        add("manifest.json", json.dumps(manifest).encode())
        add("repositories", b"{}")
    return path, diff_ids


def test_import_docker_archive(tmp_path: Path, store: ImageStore) -> None:
    archive, diff_ids = _docker_archive(tmp_path / "saved.tar")
    (image,) = import_docker_archive(archive, store)
    assert image.media_type == DOCKER_MANIFEST
    assert [d.digest for d in image.manifest.layers] == diff_ids
    assert sorted(image.tags) == ["example.com/app:1", "example.com/app:latest"]
    assert image.config.command() == ["/bin/tool"]
    (again,) = import_docker_archive(archive, ImageStore(tmp_path / "other"))
    assert again.digest == image.digest  # the constructed manifest is deterministic


def test_docker_archive_layer_must_match_diff_id(tmp_path: Path, store: ImageStore) -> None:
    archive, diff_ids = _docker_archive(tmp_path / "bad.tar", corrupt_layer=True)
    with pytest.raises(DigestMismatch) as mismatch:
        import_docker_archive(archive, store)
    assert mismatch.value.expected == diff_ids[1]
    assert store.list() == []
