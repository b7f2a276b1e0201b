"""Manifest, index and image config parsing: accepted kinds, refusals, platform choice."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kelpie.images import ImageNotFound
from kelpie.images._manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageConfig,
    Index,
    InvalidManifest,
    InvalidPlatform,
    Manifest,
    NoDefaultCommand,
    Platform,
    parse_image_config,
    parse_manifest_document,
    select_platform,
)
from kelpie.vm import ConfigError

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def _desc(digest: str, media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip",
          **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": 10, **extra}


def _manifest(media_type: str | None = OCI_MANIFEST, **overrides: Any) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": _desc(D1, "application/vnd.oci.image.config.v1+json"),
        "layers": [_desc(D2), _desc(D3)],
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(overrides)
    return json.dumps(doc).encode()


def _index(entries: list[dict[str, Any]], media_type: str = OCI_INDEX) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    ).encode()


def _entry(digest: str, os: str, arch: str, variant: str | None = None) -> dict[str, Any]:
    platform = {"os": os, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return _desc(digest, OCI_MANIFEST, platform=platform)


# -- manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", sorted(MANIFEST_MEDIA_TYPES))
def test_manifest_kinds_parse(media_type: str) -> None:
    parsed = parse_manifest_document(_manifest(media_type))
    assert isinstance(parsed, Manifest)
    assert parsed.media_type == media_type
    assert parsed.config.digest == D1
    assert [layer.digest for layer in parsed.layers] == [D2, D3]
    assert parsed.layers[0].size == 10


def test_media_type_from_argument_when_document_has_none() -> None:
    parsed = parse_manifest_document(_manifest(None), DOCKER_MANIFEST)
    assert parsed.media_type == DOCKER_MANIFEST


def test_content_type_parameters_and_generic_types_are_ignored() -> None:
    parsed = parse_manifest_document(_manifest(), f"{OCI_MANIFEST}; charset=utf-8")
    assert parsed.media_type == OCI_MANIFEST
    assert parse_manifest_document(_manifest(), "application/json").media_type == OCI_MANIFEST


def test_kind_by_shape_when_no_media_type_anywhere() -> None:
    assert isinstance(parse_manifest_document(_manifest(None)), Manifest)
    doc = json.loads(_index([_entry(D1, "linux", "amd64")]))
    del doc["mediaType"]
    assert isinstance(parse_manifest_document(json.dumps(doc).encode()), Index)


def test_disagreeing_media_types_refused() -> None:
    with pytest.raises(InvalidManifest, match="must agree"):
        parse_manifest_document(_manifest(OCI_MANIFEST), DOCKER_MANIFEST)


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ],
)
def test_docker_schema1_refused(media_type: str) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    with pytest.raises(InvalidManifest, match="schema 1"):
        parse_manifest_document(body, media_type)
    with pytest.raises(InvalidManifest, match="schema 1"):
        parse_manifest_document(body)


def test_unknown_media_type_lists_known() -> None:
    with pytest.raises(InvalidManifest, match=r"not one of .*oci\.image\.index"):
        parse_manifest_document(_manifest("application/vnd.example+json"))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "JSON"),
        (b"[]", "JSON object"),
        (_manifest(schemaVersion=3), "schemaVersion"),
        (_manifest(layers="x"), "'layers'"),
        (_manifest(config=None), "'config'"),
        (_manifest(layers=[{"mediaType": "x", "digest": D2, "size": -1}]), "'size'"),
        (_manifest(layers=[{"mediaType": "x", "digest": D2, "size": True}]), "'size'"),
        (_manifest(layers=[{"digest": D2, "size": 1}]), "'mediaType'"),
        (_manifest(layers=[_desc("sha256:../../etc/passwd")]), "invalid digest"),
        (_manifest(layers=[_desc("md5:" + "a" * 32)]), "not supported"),
        (_manifest(layers=[_desc(D2.upper())]), "invalid digest"),
        (_manifest(layers=[_desc(D2, annotations={"k": 1})]), "annotations"),
    ],
)
def test_malformed_manifests_refused(body: bytes, message: str) -> None:
    with pytest.raises(InvalidManifest, match=message):
        parse_manifest_document(body)


def test_oversized_document_refused() -> None:
    with pytest.raises(InvalidManifest, match="limit"):
        parse_manifest_document(b" " * (4 << 20) + b"{}")


def test_descriptor_annotations_read_only() -> None:
    parsed = parse_manifest_document(_manifest(layers=[_desc(D2, annotations={"a": "b"})]))
    assert isinstance(parsed, Manifest)
    assert dict(parsed.layers[0].annotations) == {"a": "b"}
    with pytest.raises(TypeError):
        parsed.layers[0].annotations["a"] = "c"  # type: ignore[index]


# -- indexes and platforms ------------------------------------------------------------


@pytest.mark.parametrize("media_type", sorted(INDEX_MEDIA_TYPES))
def test_index_kinds_parse(media_type: str) -> None:
    parsed = parse_manifest_document(_index([_entry(D1, "linux", "amd64")], media_type))
    assert isinstance(parsed, Index)
    assert parsed.media_type == media_type
    assert parsed.manifests[0].platform == Platform("linux", "amd64")


def _multi() -> Index:
    parsed = parse_manifest_document(
        _index(
            [
                _entry(D1, "linux", "amd64"),
                _entry(D2, "linux", "arm64"),  # arm64 without a variant means v8
                _entry(D3, "linux", "arm", "v7"),
                _desc("sha256:" + "4" * 64, OCI_MANIFEST),  # e.g. an attestation: no platform
            ],
            DOCKER_MANIFEST_LIST,
        )
    )
    assert isinstance(parsed, Index)
    return parsed


def test_select_platform() -> None:
    index = _multi()
    assert select_platform(index, Platform("linux", "amd64")).digest == D1
    assert select_platform(index, Platform("linux", "arm64", "v8")).digest == D2
    assert select_platform(index, Platform("linux", "arm")).digest == D3
    assert select_platform(index, Platform.parse("linux/arm/v7")).digest == D3


def test_select_platform_prefers_exact_variant() -> None:
    parsed = parse_manifest_document(
        _index([_entry(D1, "linux", "arm", "v6"), _entry(D2, "linux", "arm", "v7")])
    )
    assert isinstance(parsed, Index)
    assert select_platform(parsed, Platform("linux", "arm", "v7")).digest == D2
    assert select_platform(parsed, Platform("linux", "arm")).digest == D1


def test_select_platform_lists_available() -> None:
    with pytest.raises(ImageNotFound) as info:
        select_platform(_multi(), Platform("linux", "s390x"))
    message = str(info.value)
    assert "linux/s390x" in message
    assert "linux/amd64, linux/arm/v7, linux/arm64" in message
    with pytest.raises(ImageNotFound, match="linux/arm/v7"):
        select_platform(_multi(), Platform("linux", "arm", "v5"))


def test_platform_parse_and_host() -> None:
    assert Platform.parse("linux/amd64") == Platform("linux", "amd64")
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.parse("linux/x86_64") == Platform("linux", "amd64")
    host = Platform.host()
    assert host.os == "linux"
    assert host.architecture in {"amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64"}
    if host.architecture == "arm64":
        assert host.variant == "v8"
    assert str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", "Linux/amd64", ""])
def test_platform_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidPlatform) as info:
        Platform.parse(text)
    assert isinstance(info.value, ConfigError)
    assert "os/architecture" in str(info.value) or "lowercase" in str(info.value)


# -- image config ---------------------------------------------------------------------


def _config(runtime: dict[str, Any] | None, **top: Any) -> bytes:
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [D2, D3]},
        **top,
    }
    if runtime is not None:
        doc["config"] = runtime
    return json.dumps(doc).encode()


def test_parse_image_config() -> None:
    config = parse_image_config(
        _config({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
            "Env": ["PATH=/usr/bin:/bin", "A=b=c"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "Labels": {"x": "y"},
        })
    )
    assert config.entrypoint == ("/bin/sh", "-c")
    assert config.cmd == ("echo hi",)
    assert config.env == ("PATH=/usr/bin:/bin", "A=b=c")
    assert config.environment() == {"PATH": "/usr/bin:/bin", "A": "b=c"}
    assert (config.working_dir, config.user) == ("/srv", "1000:1000")
    assert config.platform == Platform("linux", "amd64")
    assert config.diff_ids == (D2, D3)
    assert dict(config.labels) == {"x": "y"}


def test_docker_style_nulls_are_empty() -> None:
    config = parse_image_config(
        _config({"Entrypoint": None, "Cmd": None, "Env": None, "WorkingDir": None})
    )
    assert config == ImageConfig(architecture="amd64", os="linux", diff_ids=(D2, D3))
    assert parse_image_config(_config(None)).cmd == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_config({"Cmd": "echo"}), "'Cmd' must be a list"),
        (_config({"Env": ["NOEQUALS"]}), "KEY=VALUE"),
        (_config({"User": 0}), "'User' must be a string"),
        (_config([]), "'config' must be an object"),  # type: ignore[arg-type]
        (_config({}, rootfs={"diff_ids": ["sha256:xyz"]}), "invalid digest"),
    ],
)
def test_malformed_config_refused(body: bytes, message: str) -> None:
    with pytest.raises(InvalidManifest, match=message):
        parse_image_config(body)


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "override", "expected"),
    [
        ((), ("sh",), None, ["sh"]),
        ((), ("sh",), ["echo", "x"], ["echo", "x"]),
        (("/entry",), ("a", "b"), None, ["/entry", "a", "b"]),
        (("/entry",), ("a", "b"), ["c"], ["/entry", "c"]),
        (("/entry",), (), None, ["/entry"]),
        ((), ("sh",), [], ["sh"]),
    ],
)
def test_command_rules(
    entrypoint: tuple[str, ...], cmd: tuple[str, ...], override: list[str] | None,
    expected: list[str],
) -> None:
    assert ImageConfig(entrypoint=entrypoint, cmd=cmd).command(override) == expected


def test_no_command_is_an_error_naming_the_problem() -> None:
    with pytest.raises(NoDefaultCommand, match="no default command") as info:
        ImageConfig().command(None)
    assert isinstance(info.value, ConfigError)
