"""ImageReference.parse: Docker Hub defaults, ports, tags, digests, and clear refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kelpie import ConfigError, KelpieError
from kelpie.images import ImageError, ImageReference, InvalidReference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("user/app", "docker.io/user/app:latest"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine:edge", "docker.io/library/alpine:edge"),
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("localhost:5000/x:v1", "localhost:5000/x:v1"),
        ("reg.example.com:443/team/sub/app:1.0-rc_2", "reg.example.com:443/team/sub/app:1.0-rc_2"),
        ("quay.io/coreos/etcd", "quay.io/coreos/etcd:latest"),
        ("Registry.Example.com/app", "Registry.Example.com/app:latest"),
        ("[::1]:5000/app", "[::1]:5000/app:latest"),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest"),
        (f"alpine@{DIGEST}", f"docker.io/library/alpine@{DIGEST}"),
        (f"alpine:3@{DIGEST}", f"docker.io/library/alpine:3@{DIGEST}"),
        (f"localhost:5000/x@{DIGEST}", f"localhost:5000/x@{DIGEST}"),
        ("a__b/c--d.e", "docker.io/a__b/c--d.e:latest"),
        ("alpine:Latest_1", "docker.io/library/alpine:Latest_1"),
        ("localhost:5000", "docker.io/library/localhost:5000"),
    ],
)
def test_parse_normalises(text: str, expected: str) -> None:
    assert str(ImageReference.parse(text)) == expected


def test_fields_and_familiar_form() -> None:
    ref = ImageReference.parse(f"alpine:3@{DIGEST}")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "docker.io", "library/alpine", "3", DIGEST,
    )
    assert ref.name == "docker.io/library/alpine"
    assert ref.familiar == f"alpine:3@{DIGEST}"
    assert ImageReference.parse("user/app").familiar == "user/app:latest"
    assert ImageReference.parse("localhost:5000/x").familiar == "localhost:5000/x:latest"
    assert ImageReference.parse(f"x@{DIGEST}").tag is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("Alpine", "must be lowercase"),
        ("user/App", "must be lowercase"),
        ("alpine:", "tag ''"),
        ("alpine:-x", "tag '-x'"),
        ("alpine:" + "t" * 129, "1-128"),
        ("alpine:a b", "tag 'a b'"),
        ("alpine@sha256:abc", "64 lowercase hex"),
        ("alpine@sha256:" + "AB" * 32, "64 lowercase hex"),
        ("alpine@md5:" + "ab" * 16, "must be 'sha256:'"),
        ("alpine@", "must be 'sha256:'"),
        ("a//b", "'(empty)'"),
        ("a/b/", "'(empty)'"),
        ("/a", "'(empty)'"),
        ("a-/b", "part 'a-'"),
        ("_a", "part '_a'"),
        ("a...b", "part 'a...b'"),
        ("bad_host.com/x", "registry 'bad_host.com'"),
        ("localhost:0/x", "port"),
        ("localhost:99999/x", "port"),
        ("localhost:abc/x", "port"),
        ("-host.com/x", "registry"),
        ("localhost:5000/", "empty"),
        ("a" * 250 + "/" + "b" * 10, "longer than 255"),
    ],
)
def test_invalid_references_say_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(InvalidReference) as info:
        ImageReference.parse(text)
    assert complaint in str(info.value)
    assert info.value.text == text
    assert info.value.problems


def test_invalid_reference_is_in_the_error_tree() -> None:
    with pytest.raises(InvalidReference) as info:
        ImageReference.parse("UPPER")
    assert isinstance(info.value, ImageError)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, KelpieError)
    assert isinstance(info.value, ValueError)


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidReference, match="expected a str"):
        ImageReference.parse(42)  # type: ignore[arg-type]


# --- properties ----------------------------------------------------------------------------

_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--"])


@st.composite
def path_components(draw: st.DrawFn) -> str:
    parts = [draw(_alnum)]
    for _ in range(draw(st.integers(0, 2))):
        parts += [draw(_separator), draw(_alnum)]
    return "".join(parts)


repositories = st.lists(path_components(), min_size=1, max_size=3).map("/".join)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?", fullmatch=True)
registries = st.one_of(
    st.just("localhost"),
    st.tuples(_label, _label).map(".".join),
    st.tuples(st.sampled_from(["localhost", "example.com", "10.0.0.1"]), st.integers(1, 65535))
    .map(lambda hp: f"{hp[0]}:{hp[1]}"),
)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digests = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@given(registries, repositories, st.none() | tags, st.none() | digests)
def test_parse_recovers_the_parts(
    registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    text = f"{registry}/{repository}"
    text += f":{tag}" if tag is not None else ""
    text += f"@{digest}" if digest is not None else ""
    ref = ImageReference.parse(text)
    expected_tag = "latest" if tag is None and digest is None else tag
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry, repository, expected_tag, digest,
    )


hub_repositories = repositories.filter(
    lambda r: "." not in r.split("/")[0] and r.split("/")[0] != "localhost"
)


@given(hub_repositories, st.none() | tags)
def test_hub_names_get_defaults(repository: str, tag: str | None) -> None:
    """A first component without '.' or ':' (and not localhost) is a Docker Hub path."""
    text = repository + (f":{tag}" if tag is not None else "")
    ref = ImageReference.parse(text)
    assert ref.registry == "docker.io"
    if "/" in repository:
        assert ref.repository == repository
    else:
        assert ref.repository == f"library/{repository}"
    assert ref.tag == (tag or "latest")


@given(st.text(max_size=80))
def test_parse_is_total_and_canonical(text: str) -> None:
    """Any input either parses to a fixed point of parse/str or raises InvalidReference."""
    try:
        ref = ImageReference.parse(text)
    except InvalidReference:
        return
    again = ImageReference.parse(str(ref))
    assert again == ref
    assert ImageReference.parse(ref.familiar) == ref


@given(registries, repositories)
def test_uppercase_repository_is_refused(registry: str, repository: str) -> None:
    upper = repository.upper()
    if upper == repository:
        return
    with pytest.raises(InvalidReference, match="lowercase"):
        ImageReference.parse(f"{registry}/{upper}")
