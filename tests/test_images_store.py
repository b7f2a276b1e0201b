"""The image store: adding verified images, resolving names, tags, removal, holders, prune.

Images are built here with the independent tar fixture and their blobs put into the store
directly, as a registry pull or layout import would.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fixtures.images.tarbuild import TAR, TAR_GZIP, Entry, file, gzipped, layer_tar, sha256
from kelpie.images import (
    BlobNotFound,
    DigestMismatch,
    ImageNotFound,
    ImageReference,
    InvalidReference,
    LayerError,
)
from kelpie.images._errors import AmbiguousImage, ImageInUse, InvalidManifest
from kelpie.images._manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from kelpie.images._store import ImageStore, StoredImage
from kelpie.vm import StorageError

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


def image_documents(
    store: ImageStore,
    layers: Sequence[Sequence[Entry]],
    *,
    runtime: dict[str, Any] | None = None,
    gzip_layers: bool = True,
    diff_ids: list[str] | None = None,
    media_type: str = OCI_MANIFEST,
) -> bytes:
    """Put the layer and config blobs of an image into ``store``; return its manifest."""
    descriptors, computed = [], []
    for entries in layers:
        tar = layer_tar(entries)
        computed.append(sha256(tar))
        blob = gzipped(tar) if gzip_layers else tar
        store.blobs.put(blob, sha256(blob))
        descriptors.append({
            "mediaType": TAR_GZIP if gzip_layers else TAR, "digest": sha256(blob),
            "size": len(blob),
        })
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": runtime or {},
        "rootfs": {"type": "layers", "diff_ids": computed if diff_ids is None else diff_ids},
    }).encode()
    store.blobs.put(config, sha256(config))
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
        "layers": descriptors,
    }).encode()


def put_image(
    store: ImageStore,
    layers: Sequence[Sequence[Entry]],
    tag: str | None = "example.com/test/app:1",
    **kw: Any,
) -> StoredImage:
    """Store an image of ``layers`` tagged ``tag`` (None: untagged)."""
    manifest = image_documents(store, layers, **kw)
    reference = ImageReference.parse(tag) if tag else None
    return store.add_image(reference, manifest, OCI_MANIFEST)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def _stored_blobs(store: ImageStore) -> set[str]:
    directory = store.root / "blobs" / "sha256"
    return {"sha256:" + p.name for p in directory.iterdir()} if directory.exists() else set()


# -- adding and resolving ---------------------------------------------------------------


def test_add_and_resolve_every_way(store: ImageStore) -> None:
    image = put_image(
        store, [[file("a", "1")], [file("b", "2")]], runtime={"Cmd": ["/bin/sh"]}
    )
    assert image.tags == ("example.com/test/app:1",)
    assert image.config.cmd == ("/bin/sh",)
    assert len(image.manifest.layers) == 2
    assert image.id == image.digest[7:19]
    expected_size = sum(store.blobs.path(d).stat().st_size for d in _stored_blobs(store))
    assert image.size == expected_size
    for text in [
        "example.com/test/app:1",
        " example.com/test/app:1 ",
        image.digest,
        f"example.com/test/app@{image.digest}",
        image.id,
        image.digest[:14],
        image.digest[7:],
    ]:
        assert store.resolve(text) == image, text
    assert store.get(image.digest) == image


def test_docker_hub_short_names(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]], tag="alpine")
    assert image.tags == ("docker.io/library/alpine:latest",)
    for text in ["alpine", "alpine:latest", "docker.io/library/alpine", "library/alpine"]:
        assert store.resolve(text).digest == image.digest


def test_docker_schema2_manifest(store: ImageStore) -> None:
    manifest = image_documents(store, [[file("a")]], media_type=DOCKER_MANIFEST)
    image = store.add_image(ImageReference.parse("d/x:1"), manifest, DOCKER_MANIFEST)
    assert image.media_type == DOCKER_MANIFEST
    assert ImageStore(store.root).resolve("d/x:1").media_type == DOCKER_MANIFEST


def test_unknown_names_are_clear_errors(store: ImageStore) -> None:
    put_image(store, [[file("a")]])
    with pytest.raises(ImageNotFound, match=r"no image 'example.com/test/app:2'.*tag reference"):
        store.resolve("example.com/test/app:2")
    with pytest.raises(ImageNotFound, match="no image with digest"):
        store.resolve("x@sha256:" + "0" * 64)
    with pytest.raises(ImageNotFound):
        store.resolve("sha256:" + "0" * 64)
    with pytest.raises(InvalidReference, match="must be lowercase"):
        store.resolve("Not/A/Valid/REF")
    with pytest.raises(ValueError, match="hex"):
        store.resolve("sha256:xyz")


def test_ambiguous_prefix(store: ImageStore) -> None:
    images: dict[str, StoredImage] = {}
    for n in range(17):  # 17 images: two must share the first hex digit
        image = put_image(store, [[file("n", str(n))]], tag=f"x/y:{n}")
        clash = images.get(image.digest[7])
        if clash is not None:
            break
        images[image.digest[7]] = image
    assert clash is not None
    with pytest.raises(AmbiguousImage, match="matches 2 images") as info:
        store.resolve(image.digest[7])
    assert set(info.value.matches) == {image.digest, clash.digest}
    assert store.resolve(image.digest[7:40]) == image


def test_persisted_across_instances(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]])
    again = ImageStore(store.root)
    assert again.resolve("example.com/test/app:1") == image
    assert [i.digest for i in again.list()] == [image.digest]
    document = json.loads((store.root / "images.json").read_text())
    assert document["version"] == 1
    assert document["images"][image.digest]["tags"] == ["example.com/test/app:1"]


def test_damaged_records_are_a_storage_error(store: ImageStore) -> None:
    put_image(store, [[file("a")]])
    (store.root / "images.json").write_text("{not json")
    with pytest.raises(StorageError, match="damaged"):
        store.list()


def test_default_root_is_under_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KELPIE_STATE_DIR", str(tmp_path / "state"))
    assert ImageStore().root == tmp_path / "state" / "images"


# -- what add_image refuses -------------------------------------------------------------


def test_missing_layer_refused(store: ImageStore) -> None:
    manifest = image_documents(store, [[file("a")]])
    layer = json.loads(manifest)["layers"][0]["digest"]
    store.blobs.delete(layer)
    with pytest.raises(BlobNotFound, match=layer):
        store.add_image(None, manifest, OCI_MANIFEST)
    assert store.list() == []


def test_corrupt_layer_refused(store: ImageStore) -> None:
    manifest = image_documents(store, [[file("a", "content")]])
    path = store.blobs.path(json.loads(manifest)["layers"][0]["digest"])
    path.chmod(0o644)
    path.write_bytes(b"x" * path.stat().st_size)
    with pytest.raises(DigestMismatch):
        store.add_image(None, manifest, OCI_MANIFEST)
    assert store.list() == []


def test_declared_size_must_match(store: ImageStore) -> None:
    document = json.loads(image_documents(store, [[file("a")]]))
    document["layers"][0]["size"] += 1
    with pytest.raises(InvalidManifest, match="declared as"):
        store.add_image(None, json.dumps(document).encode(), OCI_MANIFEST)


def test_reference_digest_must_match(store: ImageStore) -> None:
    manifest = image_documents(store, [[file("a")]])
    reference = ImageReference.parse("x/y@sha256:" + "0" * 64)
    with pytest.raises(DigestMismatch):
        store.add_image(reference, manifest, OCI_MANIFEST)
    ok = ImageReference.parse(f"x/y:1@{sha256(manifest)}")
    assert store.add_image(ok, manifest, OCI_MANIFEST).tags == ("docker.io/x/y:1",)


def test_index_refused(store: ImageStore) -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    with pytest.raises(InvalidManifest, match="select_platform"):
        store.add_image(None, index, OCI_INDEX)


def test_diff_ids_must_correspond(store: ImageStore) -> None:
    manifest = image_documents(store, [[file("a")]], diff_ids=[])
    with pytest.raises(InvalidManifest, match="1 layers but the config lists 0"):
        store.add_image(None, manifest, OCI_MANIFEST)


def test_unsupported_layer_and_config_types(store: ImageStore) -> None:
    document = json.loads(image_documents(store, [[file("a")]]))
    document["layers"][0]["mediaType"] = "application/vnd.example.layer"
    with pytest.raises(LayerError, match="supported"):
        store.add_image(None, json.dumps(document).encode(), OCI_MANIFEST)
    document = json.loads(image_documents(store, [[file("a")]]))
    document["config"]["mediaType"] = "application/vnd.cncf.helm.config.v1+json"
    with pytest.raises(InvalidManifest, match="not a container image config"):
        store.add_image(None, json.dumps(document).encode(), OCI_MANIFEST)


# -- tags, removal, holders, prune ------------------------------------------------------


def test_tag_moves_to_the_new_image(store: ImageStore) -> None:
    old = put_image(store, [[file("a", "old")]])
    new = put_image(store, [[file("a", "new")]])
    assert store.resolve("example.com/test/app:1").digest == new.digest
    assert store.get(old.digest).tags == ()
    assert store.prune() == [old.digest]
    assert [i.digest for i in store.list()] == [new.digest]


def test_remove_by_tag_untags_then_deletes(store: ImageStore) -> None:
    shared = [file("base", "shared")]
    image = put_image(store, [shared, [file("a")]], tag="x/a:1")
    store.add_image(ImageReference.parse("x/a:2"), store.blobs.read_bytes(image.digest),
                    OCI_MANIFEST)
    other = put_image(store, [shared], tag="x/b:1")
    assert store.remove("x/a:1") == []
    assert store.resolve("x/a:2").digest == image.digest
    assert store.remove("x/a:2") == [image.digest]
    with pytest.raises(ImageNotFound):
        store.resolve(image.digest)
    remaining = _stored_blobs(store)
    assert image.digest not in remaining
    assert image.manifest.layers[1].digest not in remaining
    assert image.manifest.layers[0].digest in remaining  # still used by x/b:1
    assert store.resolve("x/b:1") == other


def test_remove_by_id_with_several_tags_needs_force(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]], tag="x/a:1")
    store.add_image(ImageReference.parse("x/a:2"), store.blobs.read_bytes(image.digest),
                    OCI_MANIFEST)
    with pytest.raises(ImageInUse, match="2 tags"):
        store.remove(image.id)
    assert store.remove(image.id, force=True) == [image.digest]
    assert store.list() == []
    assert _stored_blobs(store) == set()


def test_held_image_is_never_deleted(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]])
    store.retain(image.digest, "sandbox:one")
    store.retain(image.digest, "sandbox:one")  # idempotent
    store.retain(image.digest, "snapshot:two")
    assert store.holders(image.digest) == ("sandbox:one", "snapshot:two")
    with pytest.raises(ImageInUse, match="in use by sandbox:one, snapshot:two"):
        store.remove(image.digest)
    assert store.remove(image.digest, force=True) == []  # untagged, kept while held
    assert store.get(image.digest).tags == ()
    assert store.prune(orphan_age=0) == []
    assert store.get(image.digest).holders == ("sandbox:one", "snapshot:two")
    assert store.release(image.digest, "sandbox:one") is True
    assert store.release(image.digest, "sandbox:one") is False
    assert store.prune(orphan_age=0) == []
    assert store.release(image.digest, "snapshot:two") is True
    assert store.prune(orphan_age=0) == [image.digest]
    assert _stored_blobs(store) == set()


def test_untagging_a_held_image_keeps_it(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]])
    store.retain(image.digest, "template:t")
    assert store.remove("example.com/test/app:1") == []
    assert store.get(image.digest).holders == ("template:t",)


def test_retain_checks_image_and_holder(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]])
    with pytest.raises(ImageNotFound, match="cannot retain"):
        store.retain("sha256:" + "0" * 64, "sandbox:x")
    with pytest.raises(ValueError, match="holder"):
        store.retain(image.digest, "")
    with pytest.raises(ValueError, match="holder"):
        store.retain(image.digest, "bad\nname")


def test_prune_keeps_young_orphans(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]])
    orphan = b"a blob of an interrupted pull"
    store.blobs.put(orphan, sha256(orphan))
    assert store.prune() == []
    assert sha256(orphan) in _stored_blobs(store)
    old = time.time() - 7200
    os.utime(store.blobs.path(sha256(orphan)), (old, old))
    assert store.prune() == []
    assert _stored_blobs(store) == {
        image.digest, image.manifest.config.digest, image.manifest.layers[0].digest
    }


def test_prune_removes_caches_of_removed_images(store: ImageStore) -> None:
    image = put_image(store, [[file("a")]], tag=None)
    kept = put_image(store, [[file("b")]])
    for digest in (image.digest, kept.digest):
        cache = store.rootfs_cache(digest)
        (cache / "sub").mkdir(parents=True)
        (cache / "sub").chmod(0o555)
        store.ext4_cache(digest).parent.mkdir(exist_ok=True)
        store.ext4_cache(digest).write_bytes(b"")
    assert store.prune() == [image.digest]
    assert not store.rootfs_cache(image.digest).exists()
    assert not store.ext4_cache(image.digest).exists()
    assert store.rootfs_cache(kept.digest).exists()
    assert store.ext4_cache(kept.digest).exists()
