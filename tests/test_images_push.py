"""Pushing images to a real registry (Debian's ``docker-registry`` on loopback): every blob
uploaded once, in chunks; what the registry has already is not sent again; blobs of an
image from another repository of the same registry are mounted, not sent; a chunk that
failed resumes where the registry says it is (or, when its answer was lost, the blob goes
again in a new session); the image pulled back is the same,
byte for byte, and skopeo reads it; a registry behind a password takes the push with
credentials and refuses it, clearly, without."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import real_part_missing
from fixtures.images import tarbuild
from kelpie.images import (
    Credentials,
    ImageStore,
    InvalidReference,
    RegistryAuth,
    RegistryClient,
    RegistryError,
    RetryPolicy,
    StoredImage,
    import_oci_layout,
    pull_image,
    push_image,
)
from kelpie.images._push import ImagePush
from kelpie.images._reference import ImageReference
from registry_server import SKOPEO, RunningRegistry, missing_tools, start_registry

USER, PASSWORD = "bob", "staple battery"
PAYLOAD = random.Random(18).randbytes(300_000)  # incompressible: several 64 KiB chunks


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRegistry,
                                                                           RunningRegistry]]:
    missing = missing_tools(auth=True)
    if missing:
        real_part_missing(f"push tests need {', '.join(missing)} (see scripts/setup)")
    work = tmp_path_factory.mktemp("push-registry")
    open_registry = start_registry(work / "open")
    locked = start_registry(work / "locked", credentials=(USER, PASSWORD))
    try:
        yield open_registry, locked
    finally:
        open_registry.stop()
        locked.stop()


@pytest.fixture
def local_image(tmp_path: Path) -> tuple[ImageStore, StoredImage]:
    """An image made here (imported from an OCI layout): no registry has any of it."""
    layout = tmp_path / "layout"
    tarbuild.write_oci_layout(layout, [
        [tarbuild.directory("etc"), tarbuild.file("etc/hello.txt", "hello")],
        [tarbuild.file("data.bin", PAYLOAD)],
    ], tag="v1")
    store = ImageStore(tmp_path / "store")
    (image,) = import_oci_layout(layout, store, reference="example.com/local/app:v1")
    return store, image


def _blobs(image: StoredImage) -> set[str]:
    return {image.manifest.config.digest, *(layer.digest for layer in image.manifest.layers)}


def _client(**kwargs: object) -> RegistryClient:
    kwargs.setdefault("auth", RegistryAuth(use_docker_config=False))
    return RegistryClient(**kwargs)  # type: ignore[arg-type]


async def test_push_then_pull_back_gives_the_same_image_and_skopeo_reads_it(
    registries: tuple[RunningRegistry, RunningRegistry], local_image: tuple[ImageStore,
                                                                            StoredImage],
    tmp_path: Path,
) -> None:
    registry, _ = registries
    store, image = local_image
    target = f"{registry.address}/pushed/app:v1"
    seen: dict[str, int] = {}
    report = await push_image(store, "example.com/local/app:v1", target,
                              auth=RegistryAuth(use_docker_config=False),
                              progress=lambda d, done, total: seen.__setitem__(d, done))
    assert set(report.uploaded) == _blobs(image) and not report.mounted and not report.existing
    assert report.reference == f"{target}@{image.digest}" and report.digest == image.digest
    layer_bytes = sum(d.size for d in (image.manifest.config, *image.manifest.layers))
    assert report.bytes_sent == layer_bytes
    assert seen == {d.digest: d.size for d in (image.manifest.config, *image.manifest.layers)}

    empty = ImageStore(tmp_path / "empty")
    pulled = await pull_image(empty, target, auth=RegistryAuth(use_docker_config=False))
    assert pulled.digest == image.digest and _blobs(pulled) == _blobs(image)
    for digest in _blobs(image):
        assert empty.blobs.read_bytes(digest) == store.blobs.read_bytes(digest)

    inspected = await asyncio.to_thread(
        subprocess.run, [SKOPEO, "inspect", "--tls-verify=false", f"docker://{target}"],
        capture_output=True, text=True, timeout=60, check=True)
    facts = json.loads(inspected.stdout)
    assert facts["Digest"] == image.digest
    assert facts["Layers"] == [layer.digest for layer in image.manifest.layers]

    again = await push_image(store, image.digest, target,
                             auth=RegistryAuth(use_docker_config=False))
    assert set(again.existing) == _blobs(image)  # the registry has them: nothing sent
    assert not again.uploaded and again.bytes_sent == 0


async def test_blobs_of_an_image_from_the_same_registry_are_mounted(
    registries: tuple[RunningRegistry, RunningRegistry], local_image: tuple[ImageStore,
                                                                            StoredImage],
    tmp_path: Path,
) -> None:
    registry, _ = registries
    store, image = local_image
    source = f"{registry.address}/mount/source:v1"
    await push_image(store, image.digest, source, auth=RegistryAuth(use_docker_config=False))
    pulled_store = ImageStore(tmp_path / "pulled")
    pulled = await pull_image(pulled_store, source, auth=RegistryAuth(use_docker_config=False))
    report = await push_image(pulled_store, source, f"{registry.address}/mount/copy:v2",
                              auth=RegistryAuth(use_docker_config=False))
    assert set(report.mounted) == _blobs(pulled)  # cross-repository mounts: no bytes sent
    assert report.bytes_sent == 0 and not report.uploaded


class FailSecondChunk(httpx.AsyncBaseTransport):
    """Passes requests to the registry, but the first chunk that is not a blob's first
    fails once:
    ``lost``: after the registry took it (its answer is lost); else before it is sent."""

    def __init__(self, *, lost: bool) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._lost = lost
        self.patches = 0  # chunks the registry received
        self.status_queries = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and "/blobs/uploads/" in request.url.path:
            self.status_queries += 1
        if request.method == "PATCH":
            failing = not request.headers["content-range"].startswith("0-") \
                and not getattr(self, "_failed", False)
            if failing and not self._lost:
                self._failed = True
                raise httpx.ConnectError("connection refused", request=request)
            self.patches += 1
            response = await self._inner.handle_async_request(request)
            if failing:
                self._failed = True
                await response.aread()
                await response.aclose()
                raise httpx.ReadError("connection reset reading the answer", request=request)
            return response
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


CHUNK = 64 << 10


@pytest.mark.parametrize("lost", [False, True], ids=["chunk-not-sent", "answer-lost"])
async def test_a_failed_chunk_resumes_or_restarts_as_the_registry_says(
    registries: tuple[RunningRegistry, RunningRegistry], local_image: tuple[ImageStore,
                                                                            StoredImage],
    tmp_path: Path, lost: bool,
) -> None:
    registry, _ = registries
    store, image = local_image
    transport = FailSecondChunk(lost=lost)

    async def no_wait(_: float) -> None:
        await asyncio.sleep(0)

    target = ImageReference.parse(f"{registry.address}/resume-{int(lost)}/app:v1")
    async with _client(transport=transport, sleep=no_wait,
                       retry=RetryPolicy(attempts=3)) as client:
        report = await ImagePush(client, store, image, target, chunk_bytes=CHUNK).run()
    big = max(image.manifest.layers, key=lambda d: d.size)
    chunks = sum(-(-d.size // CHUNK) for d in (image.manifest.config, *image.manifest.layers))
    assert transport.status_queries == 1  # asked once how much had arrived
    # not sent: resumed from the registry's offset, nothing twice; lost: distribution
    # refuses the stale session, so the blob's first two chunks go again in a new one
    assert transport.patches == chunks + (2 if lost else 0)
    assert big.digest in report.uploaded
    assert registry.blob_file(big.digest).read_bytes() == store.blobs.read_bytes(big.digest)
    pulled = await pull_image(ImageStore(tmp_path / "back"), str(target),
                              auth=RegistryAuth(use_docker_config=False))
    assert pulled.digest == image.digest


async def test_a_registry_behind_a_password_takes_the_push_only_with_credentials(
    registries: tuple[RunningRegistry, RunningRegistry], local_image: tuple[ImageStore,
                                                                            StoredImage],
) -> None:
    _, locked = registries
    store, image = local_image
    target = f"{locked.address}/private/app:v1"
    with pytest.raises(RegistryError, match="requires a username and password"):
        await push_image(store, image.digest, target, auth=RegistryAuth(use_docker_config=False))
    wrong = RegistryAuth({locked.address: Credentials(USER, "wrong")}, use_docker_config=False)
    with pytest.raises(RegistryError, match="refused access to private/app"):
        await push_image(store, image.digest, target, auth=wrong)
    right = RegistryAuth({locked.address: Credentials(USER, PASSWORD)}, use_docker_config=False)
    report = await push_image(store, image.digest, target, auth=right)
    assert set(report.uploaded) == _blobs(image)


def test_an_image_known_by_several_names_needs_a_reference(
    local_image: tuple[ImageStore, StoredImage],
) -> None:
    store, image = local_image
    store.add_image(ImageReference.parse("example.com/other/app:v2"),
                    store.blobs.read_bytes(image.digest), image.media_type)
    with pytest.raises(InvalidReference, match=r"give the reference to push to .*several "
                                               r"names \(example.com/"):
        asyncio.run(push_image(store, image.digest))
