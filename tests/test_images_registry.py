"""Pulling from registries: a real ``docker-registry`` on 127.0.0.1 filled by skopeo, plus
``httpx.MockTransport`` registries for what a local registry cannot show (token auth,
HTTPS URLs, 503s) and a transport wrapper that cuts a download to prove resumption.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import real_part_missing
from fixtures.images import tarbuild
from kelpie.images import DigestMismatch, ImageNotFound, ImageReference, RegistryError
from kelpie.images._auth import (
    Challenge,
    Credentials,
    RegistryAuth,
    load_docker_credentials,
    registry_host_key,
)
from kelpie.images._manifest import Platform, parse_manifest_document
from kelpie.images._registry import RegistryClient, RetryPolicy
from kelpie.images._store import ImageStore
from registry_server import (
    RunningRegistry,
    missing_tools,
    start_registry,
    write_multiarch_layout,
)

USER, PASSWORD = "alice", "correct horse"
BIG_LAYER = random.Random(4).randbytes(600_000)  # incompressible: the blob is ~600 kB


# -- the real registry -----------------------------------------------------------------


@dataclass
class Registries:
    """The session's registries and what was pushed to them."""

    open: RunningRegistry
    locked: RunningRegistry
    single_layers: list[str]  # layer digests of test/single:v1, bottom first


def _single_layout(root: Path) -> None:
    tarbuild.write_oci_layout(
        root,
        [
            [tarbuild.directory("etc"), tarbuild.file("etc/hello.txt", "hello from layer 1")],
            [tarbuild.file("big.bin", BIG_LAYER), tarbuild.file("etc/two", "2")],
        ],
        tag="v1",
    )


@pytest.fixture(scope="session")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    """An open and an htpasswd-protected registry, each holding test images."""
    missing = missing_tools(auth=True)
    if missing:
        real_part_missing(f"registry tests need {', '.join(missing)} (see scripts/setup)")
    work = tmp_path_factory.mktemp("registry")
    _single_layout(work / "single")
    write_multiarch_layout(
        work / "multi",
        {
            ("linux", "amd64"): [tarbuild.file("arch", "amd64")],
            ("linux", "arm64"): [tarbuild.file("arch", "arm64")],
        },
        tag="multi",
    )
    tarbuild.write_oci_layout(work / "tamper", [[tarbuild.file("t", "tamper me " * 100)]])
    open_registry = start_registry(work / "open")
    locked = start_registry(work / "locked", credentials=(USER, PASSWORD))
    try:
        open_registry.push(work / "single", "v1", "test/single")
        open_registry.push(work / "multi", "multi", "test/multi", all_platforms=True)
        open_registry.push(work / "tamper", "latest", "test/tampered")
        locked.push(work / "single", "v1", "test/private")
        index = json.loads((work / "single" / "index.json").read_text())
        manifest_digest = index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.loads((work / "single" / "blobs" / "sha256" / manifest_digest).read_bytes())
        yield Registries(open_registry, locked, [layer["digest"] for layer in manifest["layers"]])
    finally:
        open_registry.stop()
        locked.stop()


def _client(**kwargs: object) -> RegistryClient:
    kwargs.setdefault("auth", RegistryAuth(use_docker_config=False))
    return RegistryClient(**kwargs)  # type: ignore[arg-type]


def _layer_files(store: ImageStore, digest: str) -> dict[str, bytes]:
    data = store.blobs.read_bytes(digest)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers() if m.isfile()
        }


async def test_pull_single_platform_image(registries: Registries, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    reports: dict[str, tuple[int, int]] = {}
    reference = f"{registries.open.address}/test/single:v1"
    async with _client() as client:
        image = await client.pull(
            reference, store, progress=lambda d, done, total: reports.update({d: (done, total)})
        )
    assert image.tags == (reference,)
    assert [layer.digest for layer in image.manifest.layers] == registries.single_layers
    blobs = [image.manifest.config.digest, *registries.single_layers]
    for digest in blobs:
        store.blobs.verify(digest)
    assert set(reports) == set(blobs)
    assert all(done == total for done, total in reports.values())
    assert _layer_files(store, registries.single_layers[0]) == {
        "etc/hello.txt": b"hello from layer 1"
    }
    assert _layer_files(store, registries.single_layers[1])["big.bin"] == BIG_LAYER
    assert store.resolve(reference).digest == image.digest


async def test_get_manifest_by_digest_is_verified(registries: Registries) -> None:
    async with _client() as client:
        by_tag = await client.get_manifest(
            ImageReference.parse(f"{registries.open.address}/test/single:v1")
        )
        by_digest = await client.get_manifest(
            ImageReference.parse(f"{registries.open.address}/test/single@{by_tag.digest}")
        )
    assert by_digest == by_tag
    assert by_tag.media_type == "application/vnd.oci.image.manifest.v1+json"


async def test_missing_tag_is_image_not_found(registries: Registries) -> None:
    async with _client() as client:
        with pytest.raises(ImageNotFound, match="nope"):
            await client.get_manifest(
                ImageReference.parse(f"{registries.open.address}/test/single:nope")
            )


@pytest.mark.parametrize(
    ("platform", "expected"),
    [(None, Platform.host().architecture), (Platform.parse("linux/arm64"), "arm64")],
)
async def test_pull_from_multi_platform_index(
    registries: Registries, tmp_path: Path, platform: Platform | None, expected: str
) -> None:
    if platform is None and Platform.host().architecture not in ("amd64", "arm64"):
        pytest.skip("the test index has amd64 and arm64 images only")
    store = ImageStore(tmp_path / "store")
    reference = f"{registries.open.address}/test/multi:multi"
    async with _client() as client:
        index = await client.get_manifest(ImageReference.parse(reference))
        image = await client.pull(reference, store, platform=platform)
    document = parse_manifest_document(index.data, index.media_type)
    assert document.media_type == "application/vnd.oci.image.index.v1+json"
    assert image.config.architecture == expected
    assert _layer_files(store, image.manifest.layers[0].digest) == {"arch": expected.encode()}
    assert image.tags == (reference,)


async def test_registry_with_credentials(registries: Registries, tmp_path: Path) -> None:
    reference = f"{registries.locked.address}/test/private:v1"
    async with _client() as client:
        with pytest.raises(RegistryError, match="requires a username and password") as refused:
            await client.pull(reference, ImageStore(tmp_path / "refused"))
    assert not refused.value.retriable

    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {registries.locked.address: {"auth": auth}}}))
    store = ImageStore(tmp_path / "store")
    async with _client(auth=RegistryAuth(docker_config=config)) as client:
        image = await client.pull(reference, store)
    assert [layer.digest for layer in image.manifest.layers] == registries.single_layers


async def test_wrong_password_is_refused(registries: Registries, tmp_path: Path) -> None:
    wrong = RegistryAuth({registries.locked.address: Credentials(USER, "wrong")},
                         use_docker_config=False)
    async with _client(auth=wrong) as client:
        with pytest.raises(RegistryError, match="refused access"):
            await client.pull(f"{registries.locked.address}/test/private:v1",
                              ImageStore(tmp_path / "store"))


async def test_tampered_blob_is_refused(registries: Registries, tmp_path: Path) -> None:
    reference = ImageReference.parse(f"{registries.open.address}/test/tampered:latest")
    async with _client() as client:
        _, manifest = await client.resolve(reference)
    layer = manifest.layers[0]
    data_file = registries.open.blob_file(layer.digest)
    original = data_file.read_bytes()
    data_file.write_bytes(original[:-8] + bytes(8))  # same size, different bytes
    store = ImageStore(tmp_path / "store")
    try:
        async with _client() as client:
            with pytest.raises(DigestMismatch) as mismatch:
                await client.pull(reference, store)
    finally:
        data_file.write_bytes(original)
    assert mismatch.value.expected == layer.digest
    assert not store.blobs.has(layer.digest)
    # the tampered blob's partial download is discarded; a sibling blob whose download was
    # cancelled by the failure may keep its partial file, to be resumed by the next pull
    tampered_hex = layer.digest.removeprefix("sha256:")
    assert not list((store.root / "tmp").glob(f"partial-{tampered_hex}*"))
    assert store.list() == []


# -- resuming an interrupted download --------------------------------------------------


class _CutStream(httpx.AsyncByteStream):
    """A response body that breaks off (like a dropped connection) after ``limit`` bytes."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in self._inner:
            if sent + len(chunk) >= self._limit:
                yield chunk[: self._limit - sent]
                raise httpx.ReadError("connection cut by the test")
            sent += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class CuttingTransport(httpx.AsyncBaseTransport):
    """Real HTTP, except that the first download of one blob is cut after ``limit`` bytes.

    With ``ignore_range`` the ``Range`` header is dropped, as by a server without ranges.
    """

    def __init__(self, digest: str, limit: int, *, ignore_range: bool = False) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._digest = digest
        self._limit = limit
        self._ignore_range = ignore_range
        self.blob_requests: list[tuple[str | None, int]] = []  # (Range sent, status)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        is_target = request.url.path.endswith(f"/blobs/{self._digest}")
        sent_range = request.headers.get("range")
        if is_target and self._ignore_range and sent_range:
            del request.headers["range"]
        response = await self._inner.handle_async_request(request)
        if not is_target:
            return response
        self.blob_requests.append((sent_range, response.status_code))
        if len(self.blob_requests) > 1:
            return response
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code, headers=response.headers,
            stream=_CutStream(response.stream, self._limit), extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize("ignore_range", [False, True])
async def test_interrupted_download_resumes(
    registries: Registries, tmp_path: Path, ignore_range: bool
) -> None:
    big = registries.single_layers[1]
    transport = CuttingTransport(big, 200_000, ignore_range=ignore_range)
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    store = ImageStore(tmp_path / "store")
    async with _client(transport=transport, sleep=sleep) as client:
        image = await client.pull(f"{registries.open.address}/test/single:v1", store)
    assert [r[0] for r in transport.blob_requests] == [None, "bytes=200000-"]
    assert [r[1] for r in transport.blob_requests] == [200, 200 if ignore_range else 206]
    assert delays == [RetryPolicy().delay(1)]
    store.blobs.verify(big)
    assert image.manifest.layers[1].digest == big
    assert not list((store.root / "tmp").glob("partial-*"))


# -- mocked registries: token auth, HTTPS by default, retries --------------------------


class FakeRegistry:
    """A registry at https://registry.test behind Docker token auth at https://auth.test.

    ``failures`` 503s are served before each manifest answer; ``lie`` makes the
    Docker-Content-Digest header wrong.
    """

    TOKEN = "t0ken"

    def __init__(self, *, credentials: Credentials | None = None) -> None:
        self.credentials = credentials
        self.failures = 0
        self.lie = False
        self.token_requests: list[httpx.Request] = []
        self.layer = b"layer bytes"
        self.config = json.dumps({"architecture": "amd64", "os": "linux",
                                  "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": tarbuild.sha256(self.config), "size": len(self.config)},
            "layers": [],
        }).encode()

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return self._token(request)
        assert request.url.scheme == "https"
        if request.headers.get("authorization") != f"Bearer {self.TOKEN}":
            challenge = ('Bearer realm="https://auth.test/token",service="registry.test",'
                         'scope="repository:team/app:pull"')
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        if self.failures:
            self.failures -= 1
            return httpx.Response(503)
        digest = tarbuild.sha256(b"other" if self.lie else self.manifest)
        return httpx.Response(200, content=self.manifest, headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            "Docker-Content-Digest": digest,
        })

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if self.credentials is not None and (
            request.headers.get("authorization") != self.credentials.basic_header()
        ):
            return httpx.Response(401)
        return httpx.Response(200, json={"token": self.TOKEN, "expires_in": 300})


def _mock_client(fake: FakeRegistry, auth: RegistryAuth | None = None,
                 sleep: Callable[[float], object] | None = None) -> RegistryClient:
    async def no_sleep(seconds: float) -> None:
        if sleep is not None:
            sleep(seconds)

    return RegistryClient(
        transport=httpx.MockTransport(fake.handler),
        auth=auth or RegistryAuth(use_docker_config=False),
        sleep=no_sleep,
    )


APP = ImageReference.parse("registry.test/team/app:1")


async def test_anonymous_token_flow_over_https() -> None:
    fake = FakeRegistry()
    async with _mock_client(fake) as client:
        first = await client.get_manifest(APP)
        await client.get_manifest(APP)
    assert first.data == fake.manifest
    assert len(fake.token_requests) == 1  # the token is cached for the second request
    params = fake.token_requests[0].url.params
    assert params["service"] == "registry.test"
    assert params["scope"] == "repository:team/app:pull"
    assert "authorization" not in fake.token_requests[0].headers


async def test_token_flow_with_credentials() -> None:
    fake = FakeRegistry(credentials=Credentials("bob", "pw"))
    async with _mock_client(fake) as client:
        with pytest.raises(RegistryError, match="refused anonymous access"):
            await client.get_manifest(APP)
    auth = RegistryAuth({"registry.test": Credentials("bob", "pw")}, use_docker_config=False)
    async with _mock_client(fake, auth) as client:
        assert (await client.get_manifest(APP)).data == fake.manifest


async def test_transient_errors_are_retried_with_backoff() -> None:
    fake = FakeRegistry()
    fake.failures = 2
    delays: list[float] = []
    async with _mock_client(fake, sleep=delays.append) as client:
        assert (await client.get_manifest(APP)).data == fake.manifest
    assert delays == [0.5, 1.0]

    fake.failures = 10
    async with _mock_client(fake) as client:
        with pytest.raises(RegistryError, match="503") as failed:
            await client.get_manifest(APP)
    assert failed.value.retriable


async def test_docker_content_digest_must_match() -> None:
    fake = FakeRegistry()
    fake.lie = True
    async with _mock_client(fake) as client:
        with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
            await client.get_manifest(APP)


async def test_manifest_by_digest_must_hash_to_it() -> None:
    fake = FakeRegistry()
    wrong = ImageReference.parse("registry.test/team/app@sha256:" + "0" * 64)
    async with _mock_client(fake) as client:
        with pytest.raises(DigestMismatch):
            await client.get_manifest(wrong)


def test_plain_http_only_for_loopback_and_insecure() -> None:
    client = RegistryClient(insecure=["build.internal:5000"])
    assert client.base_url("docker.io") == "https://registry-1.docker.io"
    assert client.base_url("quay.io") == "https://quay.io"
    assert client.base_url("build.internal:5000") == "http://build.internal:5000"
    assert client.base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert client.base_url("localhost") == "http://localhost"


# -- credentials and challenges --------------------------------------------------------


def test_docker_config_credentials(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw:with:colons").decode()},
        "http://127.0.0.1:5000": {"username": "u", "password": "p"},
        "ghcr.io": {},
    }}))
    found = load_docker_credentials(config)
    assert found == {
        "docker.io": Credentials("hub", "pw:with:colons"),
        "127.0.0.1:5000": Credentials("u", "p"),
    }
    assert "pw" not in repr(found["docker.io"])
    assert load_docker_credentials(tmp_path / "absent.json") == {}
    config.write_text('{"auths": {"x.io": {"auth": "not base64!"}}}')
    with pytest.raises(RegistryError, match="not base64"):
        load_docker_credentials(config)


def test_challenge_parsing() -> None:
    challenge = Challenge.parse(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull,push"'
    )
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull,push",
    }
    assert Challenge.parse('Basic realm="x"') == Challenge("basic", {"realm": "x"})
    assert registry_host_key("https://Index.Docker.io/v1/") == "docker.io"
