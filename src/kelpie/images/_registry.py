"""Pulling images from an OCI / Docker registry over HTTP (distribution API v2).

A pull is: ``GET /v2/<repo>/manifests/<tag|digest>`` (an index is narrowed to one
platform, then that manifest is fetched by digest), then ``GET /v2/<repo>/blobs/<digest>``
for the config and every layer, several at a time, each streamed to a partial file and
moved into the :class:`~kelpie.images.BlobStore` only once its digest and size check out.
Finally the manifest is recorded in the image store.

Trust: nothing from the network is used before it is verified. A manifest pulled by digest
must hash to that digest; a ``Docker-Content-Digest`` header must agree with the bytes;
every blob must hash to the digest its descriptor names and have its size.

Transport: HTTPS, except for registries marked insecure and loopback registries
(``localhost``, ``127.0.0.1``, ``[::1]``), which are spoken to over plain HTTP. Transient
failures (connection errors, timeouts, 429, 5xx) are retried with exponential backoff;
an interrupted blob download resumes from its partial file with ``Range: bytes=N-`` (a
server that ignores the range is read from the start again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol, TypeVar

import httpx

from kelpie.images._auth import RegistryAuth, registry_host_key
from kelpie.images._blobs import BlobStore
from kelpie.images._digest import sha256_digest
from kelpie.images._errors import BlobNotFound, DigestMismatch, ImageNotFound, RegistryError
from kelpie.images._manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_DOCUMENT_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_manifest_document,
    select_platform,
)
from kelpie.images._reference import DOCKER_HUB, ImageReference

if TYPE_CHECKING:
    from kelpie.images._store import ImageStore, StoredImage

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
"""The ``Accept`` header of a manifest request: every manifest kind a pull can use."""

DOCKER_HUB_HOST = "registry-1.docker.io"
"""Where the registry API of ``docker.io`` is served."""

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
"""Hosts always spoken to over plain HTTP (a registry on this machine, e.g. in tests)."""

PARTIAL_PREFIX = "tmp/partial-"
"""Interrupted downloads are kept as ``<blob store root>/tmp/partial-<hex>`` for resuming
(the store's scratch directory, so a prune removes ones abandoned long ago)."""

_RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class BlobProgress(Protocol):
    """Called as a blob downloads: its digest, bytes done so far, and its total size."""

    def __call__(self, digest: str, done: int, total: int) -> None:
        """Report progress of one blob."""


class RegistryReply(NamedTuple):
    """A registry's answer to :meth:`RegistryClient.request`."""

    status: int
    headers: httpx.Headers
    body: bytes
    url: str

    def error_detail(self) -> str:
        """``": CODE: message"`` from a distribution error body, or ``""``."""
        return _detail_of(self.body)


class FetchedManifest(NamedTuple):
    """A manifest document as served: its bytes, media type and (computed) sha256 digest."""

    data: bytes
    media_type: str
    digest: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently transient registry failures are retried.

    Attempt ``n`` (from 1) that fails waits ``min(base_delay * 2**(n-1), max_delay)``
    seconds before attempt ``n + 1``; after ``attempts`` tries the last error is raised.
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (counting from 1)."""
        return float(min(self.base_delay * 2 ** (attempt - 1), self.max_delay))


class RegistryClient:
    """An async client of OCI / Docker registries; use as ``async with RegistryClient()``.

    ``auth`` answers authentication challenges (default: Docker's config file for
    credentials, anonymous tokens otherwise). ``insecure`` names registries
    (``host[:port]``) allowed over plain HTTP. ``transport`` and ``sleep`` are injectable
    for tests (an ``httpx`` transport; the coroutine used to wait between retries).
    """

    def __init__(
        self,
        *,
        auth: RegistryAuth | None = None,
        insecure: Iterable[str] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        timeout: float = 60.0,
    ) -> None:
        self._auth = auth if auth is not None else RegistryAuth()
        self._insecure = frozenset(registry_host_key(r) for r in insecure)
        self._retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=True,  # httpx drops Authorization on a cross-origin redirect
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": "kelpie"},
        )
        self._blob_locks: dict[str, asyncio.Lock] = {}

    @property
    def retry_policy(self) -> RetryPolicy:
        """How failed requests are tried again."""
        return self._retry

    async def sleep(self, seconds: float) -> None:
        """Wait between attempts (the injected sleep)."""
        await self._sleep(seconds)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    def base_url(self, registry: str) -> str:
        """``scheme://host`` of ``registry``'s API (HTTPS unless insecure or loopback)."""
        host = DOCKER_HUB_HOST if registry == DOCKER_HUB else registry
        return f"{'http' if self._plain_http(registry) else 'https'}://{host}"

    def _plain_http(self, registry: str) -> bool:
        key = registry_host_key(registry)
        hostname = key if key.endswith("]") else key.rsplit(":", 1)[0]
        return key in self._insecure or hostname in LOOPBACK_HOSTS

    # -- manifests -------------------------------------------------------------------------

    async def get_manifest(self, reference: ImageReference) -> FetchedManifest:
        """Fetch the manifest or index ``reference`` names (by digest if it has one).

        Raises :class:`ImageNotFound` (404), :class:`DigestMismatch` (the bytes do not hash
        to the reference's digest or to the server's ``Docker-Content-Digest``), or
        :class:`RegistryError`.
        """
        return await self.retrying(
            f"manifest {reference}", lambda: self._get_manifest_once(reference)
        )

    async def _get_manifest_once(self, reference: ImageReference) -> FetchedManifest:
        target = reference.digest or reference.tag or "latest"
        url = f"{self.base_url(reference.registry)}/v2/{reference.repository}/manifests/{target}"

        def not_found() -> Exception:
            return ImageNotFound(f"manifest {target} not found in {reference.name}")

        async with self._open(reference, url, {"Accept": MANIFEST_ACCEPT}, not_found) as reply:
            data = await _read_limited(reply, MAX_DOCUMENT_BYTES, f"manifest of {reference}")
            media_type = reply.headers.get("content-type", "").split(";")[0].strip()
            served_digest = reply.headers.get("docker-content-digest")
        digest = sha256_digest(data)
        if reference.digest is not None:
            _check_manifest_digest(data, reference.digest, "manifest")
        if served_digest and served_digest.startswith("sha256:") and served_digest != digest:
            raise DigestMismatch(
                served_digest, digest, what=f"manifest of {reference} (Docker-Content-Digest)"
            )
        return FetchedManifest(data, media_type, digest)

    async def resolve(
        self, reference: ImageReference, platform: Platform | None = None
    ) -> tuple[FetchedManifest, Manifest]:
        """The image manifest for ``reference`` and ``platform`` (default: this host's).

        An index is narrowed with :func:`select_platform` and the chosen manifest fetched
        by digest (and checked against the index entry's size).
        """
        fetched = await self.get_manifest(reference)
        document = parse_manifest_document(fetched.data, fetched.media_type or None)
        if isinstance(document, Index):
            entry = select_platform(document, platform or Platform.host())
            by_digest = dataclasses.replace(reference, tag=None, digest=entry.digest)
            fetched = await self.get_manifest(by_digest)
            if len(fetched.data) != entry.size:
                raise DigestMismatch(
                    entry.digest, fetched.digest, expected_size=entry.size,
                    actual_size=len(fetched.data), what="platform manifest",
                )
            document = parse_manifest_document(fetched.data, fetched.media_type or None)
        if not isinstance(document, Manifest):
            raise RegistryError(
                f"{reference}: the index entry for the platform is itself an index; "
                "nested indexes are not supported"
            )
        return fetched, document

    # -- blobs -----------------------------------------------------------------------------

    async def fetch_blob(
        self,
        reference: ImageReference,
        descriptor: Descriptor,
        store: BlobStore,
        *,
        progress: BlobProgress | None = None,
    ) -> Path:
        """Download the blob ``descriptor`` of ``reference``'s repository into ``store``.

        Returns the stored path. A blob already in the store is not downloaded. The bytes
        go to ``<store>/tmp/partial-<hex>`` first; a retry resumes from there. Raises
        :class:`DigestMismatch` (nothing stored, partial file removed),
        :class:`BlobNotFound` or :class:`RegistryError`.
        """
        lock = self._blob_locks.setdefault(descriptor.digest, asyncio.Lock())
        async with lock:
            if store.has(descriptor.digest):
                _report(progress, descriptor, descriptor.size)
                return store.path(descriptor.digest)
            partial = store.root / (PARTIAL_PREFIX + descriptor.digest.removeprefix("sha256:"))
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                return await self._fetch_and_commit(reference, descriptor, store, partial, progress)
            except RegistryError as exc:
                if not exc.retriable:
                    _discard(partial)  # a partial the server refuses to extend
                raise
            except DigestMismatch:
                _discard(partial)
                raise

    async def _fetch_and_commit(
        self,
        reference: ImageReference,
        descriptor: Descriptor,
        store: BlobStore,
        partial: Path,
        progress: BlobProgress | None,
    ) -> Path:
        resumed = await self._download(reference, descriptor, partial, progress)
        try:
            return await asyncio.to_thread(_commit, store, partial, descriptor)
        except DigestMismatch:
            if not resumed:
                raise
        # The partial file came (at least partly) from an earlier attempt or process and
        # may be stale: start over once from an empty file before giving up.
        log.warning("blob %s failed to verify after resuming; downloading it again",
                    descriptor.digest)
        _discard(partial)
        await self._download(reference, descriptor, partial, progress)
        return await asyncio.to_thread(_commit, store, partial, descriptor)

    async def _download(
        self,
        reference: ImageReference,
        descriptor: Descriptor,
        partial: Path,
        progress: BlobProgress | None,
    ) -> bool:
        """Fill ``partial`` with the blob, retrying; return whether any attempt resumed."""
        resumed = False

        async def attempt() -> None:
            nonlocal resumed
            resumed = await self._download_once(reference, descriptor, partial, progress)

        await self.retrying(f"blob {descriptor.digest}", attempt)
        return resumed

    async def _download_once(
        self,
        reference: ImageReference,
        descriptor: Descriptor,
        partial: Path,
        progress: BlobProgress | None,
    ) -> bool:
        """One request for the rest of the blob; return whether it continued a partial."""
        have = _partial_size(partial, descriptor.size)
        if have == descriptor.size and have > 0:
            return True
        url = (
            f"{self.base_url(reference.registry)}/v2/{reference.repository}"
            f"/blobs/{descriptor.digest}"
        )
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"

        def not_found() -> Exception:
            return BlobNotFound(descriptor.digest, f"registry repository {reference.name}")

        async with self._open(reference, url, headers, not_found) as reply:
            start = _resume_offset(reply, have)
            if have and not start:
                log.info("registry ignored Range for %s; reading it from the start", url)
            with _PartialFile(partial, start) as out:
                done = await self._stream_into(reply, out, descriptor, start, progress)
        if done < descriptor.size:
            raise RegistryError(
                f"blob {descriptor.digest} ended after {done} of {descriptor.size} bytes",
                retriable=True,
            )
        return start > 0

    async def _stream_into(
        self,
        reply: httpx.Response,
        out: _PartialFile,
        descriptor: Descriptor,
        done: int,
        progress: BlobProgress | None,
    ) -> int:
        try:
            async for chunk in reply.aiter_raw():  # as received: nothing held back on a cut
                done += len(chunk)
                if done > descriptor.size:
                    raise DigestMismatch(
                        descriptor.digest, None, expected_size=descriptor.size,
                        actual_size=done, what="blob from registry",
                    )
                out.write(chunk)
                _report(progress, descriptor, done)
        except httpx.TransportError as exc:
            raise RegistryError(
                f"download of blob {descriptor.digest} broke off after {done} bytes: {exc}",
                retriable=True,
            ) from exc
        return done

    # -- whole images ----------------------------------------------------------------------

    async def pull(
        self,
        reference: ImageReference | str,
        store: ImageStore,
        *,
        platform: Platform | None = None,
        progress: BlobProgress | None = None,
        concurrency: int = 4,
    ) -> StoredImage:
        """Pull ``reference`` for ``platform`` (default: this host's) into ``store``.

        The config and layers are fetched ``concurrency`` at a time; ``progress`` hears
        about each blob. The image is recorded only after every blob is stored.
        """
        if isinstance(reference, str):
            reference = ImageReference.parse(reference)
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        fetched, manifest = await self.resolve(reference, platform)
        blobs = list({d.digest: d for d in (manifest.config, *manifest.layers)}.values())
        await self._fetch_all(reference, blobs, store.blobs, progress, concurrency)
        if reference.digest not in (None, fetched.digest):
            # Pulled by the digest of an index: the stored manifest is the platform's.
            reference = dataclasses.replace(reference, digest=None)
        return await asyncio.to_thread(
            store.add_image, reference, fetched.data, manifest.media_type
        )

    async def _fetch_all(
        self,
        reference: ImageReference,
        blobs: list[Descriptor],
        store: BlobStore,
        progress: BlobProgress | None,
        concurrency: int,
    ) -> None:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(descriptor: Descriptor) -> None:
            async with semaphore:
                await self.fetch_blob(reference, descriptor, store, progress=progress)

        try:
            async with asyncio.TaskGroup() as group:
                for descriptor in blobs:
                    group.create_task(one(descriptor))
        except ExceptionGroup as errors:
            # Show the caller the first real failure, not a group of one.
            raise errors.exceptions[0] from None

    # -- HTTP plumbing ---------------------------------------------------------------------

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``, tried again after a retriable :class:`RegistryError` with the
        client's back-off, up to its number of attempts."""
        for number in range(1, self._retry.attempts + 1):
            try:
                return await attempt()
            except RegistryError as exc:
                if not exc.retriable or number == self._retry.attempts:
                    raise
                delay = self._retry.delay(number)
                log.info("%s: %s; retry %d of %d in %.1fs", what, exc, number,
                         self._retry.attempts - 1, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    @contextlib.asynccontextmanager
    async def _open(
        self,
        reference: ImageReference,
        url: str,
        headers: Mapping[str, str],
        not_found: Callable[[], Exception],
    ) -> AsyncIterator[httpx.Response]:
        """GET ``url`` (answering one auth challenge) and yield the successful response."""
        reply = await self._send_authenticated(reference, url, headers)
        try:
            if reply.status_code == 404:
                raise not_found()
            if not 200 <= reply.status_code < 300:
                raise await _status_error(reply, reference, url)
            yield reply
        finally:
            await reply.aclose()

    async def _send_authenticated(
        self, reference: ImageReference, url: str, headers: Mapping[str, str], *,
        method: str = "GET", content: bytes | None = None, push: bool = False,
    ) -> httpx.Response:
        """``method url`` answering one auth challenge (scope pull, or pull and push);
        the response is streamed: close it."""
        registry = reference.registry
        scope = f"repository:{reference.repository}:{'pull,push' if push else 'pull'}"
        authorization = self._auth.header_for(registry, scope)
        for answered in (False, True):
            sent = dict(headers)
            if authorization:
                sent["Authorization"] = authorization
            reply = await self._send(registry, url, sent, method=method, content=content)
            if reply.status_code != 401:
                return reply
            await reply.aclose()
            if answered:
                break
            self._auth.forget(registry, scope)
            authorization = await self._auth.answer(
                self._client, registry, scope, reply,
                allow_plain_http=self._plain_http(registry),
            )
        raise RegistryError(
            f"registry {registry} refused access to {reference.repository} (401) even after "
            "authenticating: check the credentials, and that the repository exists"
        )

    async def request(
        self, reference: ImageReference, method: str, url: str, *,
        headers: Mapping[str, str] | None = None, content: bytes | None = None,
        push: bool = False,
    ) -> RegistryReply:
        """One authenticated request to ``reference``'s registry, the building block of
        pushes: its status, headers and body (at most 64 KiB: a registry's answers to
        these are small). ``url`` may be a path (``/v2/...``) or absolute (an upload's
        ``Location``, which may be relative to the registry: resolved against it)."""
        base = self.base_url(reference.registry)
        url = str(httpx.URL(base).join(url))
        reply = await self._send_authenticated(reference, url, headers or {}, method=method,
                                               content=content, push=push)
        try:
            body = await _read_limited(reply, 64 << 10, f"the answer to {method} {url}")
        finally:
            await reply.aclose()
        return RegistryReply(reply.status_code, reply.headers, body, url)

    async def _send(self, registry: str, url: str, headers: Mapping[str, str], *,
                    method: str = "GET", content: bytes | None = None) -> httpx.Response:
        request = self._client.build_request(method, url, headers=headers, content=content)
        try:
            return await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise RegistryError(
                f"cannot reach registry {registry} ({url}): {exc!r}", retriable=True
            ) from exc


class _PartialFile:
    """A partial blob file, truncated to ``start`` bytes and opened for appending."""

    def __init__(self, path: Path, start: int) -> None:
        self._path = path
        self._start = start
        self._file: BinaryIO | None = None

    def __enter__(self) -> _PartialFile:
        file = self._path.open("r+b" if self._path.exists() else "wb")
        file.truncate(self._start)
        file.seek(self._start)
        self._file = file
        return self

    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` (a local disk write: short enough to do on the event loop)."""
        assert self._file is not None
        self._file.write(chunk)

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)


def _partial_size(partial: Path, size: int) -> int:
    """Bytes already in ``partial`` (0 if absent; a file longer than the blob is dropped)."""
    try:
        have = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        partial.unlink()
        return 0
    return have


def _resume_offset(reply: httpx.Response, have: int) -> int:
    """Where the body of ``reply`` starts in the blob: ``have`` for a matching 206, else 0."""
    if reply.status_code != 206 or not have:
        return 0
    match = _CONTENT_RANGE.fullmatch(reply.headers.get("content-range", "").strip())
    if match is None or int(match.group(1)) != have:
        raise RegistryError(
            f"registry answered Range bytes={have}- with Content-Range "
            f"{reply.headers.get('content-range')!r}; retrying from the start",
            retriable=True,
        )
    return have


def _commit(store: BlobStore, partial: Path, descriptor: Descriptor) -> Path:
    """Move a complete partial download into ``store`` (verified there), then delete it."""
    with partial.open("rb") as data:
        path = store.put(data, descriptor.digest, size=descriptor.size)
    partial.unlink(missing_ok=True)
    return path


def _report(progress: BlobProgress | None, descriptor: Descriptor, done: int) -> None:
    if progress is not None:
        progress(descriptor.digest, done, descriptor.size)


def _check_manifest_digest(data: bytes, expected: str, what: str) -> None:
    algorithm, _, _ = expected.partition(":")
    if algorithm not in ("sha256", "sha512"):
        raise RegistryError(f"{what}: digest algorithm {algorithm!r} is not supported")
    actual = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if actual != expected:
        raise DigestMismatch(expected, actual, what=what)


async def _read_limited(reply: httpx.Response, limit: int, what: str) -> bytes:
    body = bytearray()
    try:
        async for chunk in reply.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise RegistryError(f"{what} is larger than {limit} bytes; refusing it")
    except httpx.TransportError as exc:
        raise RegistryError(f"reading {what} failed: {exc!r}", retriable=True) from exc
    return bytes(body)


async def _status_error(
    reply: httpx.Response, reference: ImageReference, url: str
) -> RegistryError:
    """The error for a non-2xx, non-404 answer, with the registry's own message."""
    detail = await _error_detail(reply)
    retriable = reply.status_code in _RETRIABLE_STATUS
    if reply.status_code == 403:
        return RegistryError(
            f"registry {reference.registry} denied access to {reference.repository} "
            f"(403){detail}: check that these credentials may pull it"
        )
    return RegistryError(
        f"registry {reference.registry} answered {reply.status_code} for {url}{detail}",
        retriable=retriable,
    )


async def _error_detail(reply: httpx.Response) -> str:
    """``": CODE: message"`` from a distribution error body, or ``""``."""
    try:
        return _detail_of(await _read_limited(reply, 16 << 10, "error body"))
    except RegistryError:
        return ""


def _detail_of(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        return f": {first.get('code', '')}: {first.get('message', '')}"
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return ""
