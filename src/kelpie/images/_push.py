"""Pushing a stored image to a registry (the OCI distribution spec's push).

For each blob, the config first: ``HEAD /v2/<repo>/blobs/<digest>`` answers whether the
registry has it (then nothing is sent). Else, when the image came from another repository
of the same registry, a cross-repository mount (``POST .../blobs/uploads/?mount=<digest>
&from=<repo>``; 201: done, not a byte sent). Else an upload session (``POST
.../blobs/uploads/``: 202 and a ``Location``) takes the blob in chunks (``PATCH`` with
``Content-Range: <first>-<last>``, each answered with the session's next ``Location`` and
``Range: 0-<last>``), closed by ``PUT <location>?digest=<digest>``. After a failed chunk (a
dropped connection, a 5xx) the upload is not restarted blindly: ``GET <location>`` says how
much the registry holds and it resumes from there; a registry that no longer accepts that
``Location`` (distribution's, when the chunk did arrive but its answer was lost: the
``Location`` carries the offset it expects) gets the blob again in a new session. The
manifest goes last (``PUT /v2/<repo>/manifests/<tag>`` with its media type), so a registry
never serves a manifest whose blobs it lacks; its ``Docker-Content-Digest`` must be the
manifest's own.

What goes out is what the digests name: each blob is verified in the store before it is
sent, and the registry checks the digest again when the upload is closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kelpie.images._auth import registry_host_key
from kelpie.images._errors import RegistryError
from kelpie.images._manifest import Descriptor
from kelpie.images._reference import ImageReference
from kelpie.images._registry import BlobProgress, RegistryClient, RegistryReply
from kelpie.images._store import ImageStore, StoredImage

CHUNK_BYTES = 16 << 20
"""The most bytes one ``PATCH`` carries (registries backed by S3 want 5 MiB or more)."""

_RANGE = re.compile(r"^(?:bytes=)?0-(\d+)$")
_RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass
class PushReport:
    """What a push did: where the image went and what each blob cost."""

    reference: str
    """The pushed image, by tag and digest (``registry/repo:tag@sha256:...``)."""
    digest: str
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bytes_sent: int = 0


class ImagePush:
    """Pushes one stored image to one reference (see the module docstring)."""

    def __init__(self, client: RegistryClient, store: ImageStore, image: StoredImage,
                 target: ImageReference, progress: BlobProgress | None = None, *,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self._chunk_bytes = chunk_bytes
        self._client = client
        self._store = store
        self._image = image
        self._target = target
        self._progress = progress
        self._repo = f"/v2/{target.repository}"
        self._report = PushReport(reference="", digest=image.digest)

    async def run(self, concurrency: int = 4) -> PushReport:
        manifest = self._image.manifest
        blobs = list({d.digest: d for d in (manifest.config, *manifest.layers)}.values())
        semaphore = asyncio.Semaphore(concurrency)

        async def one(descriptor: Descriptor) -> None:
            async with semaphore:
                await self._blob(descriptor)

        try:
            async with asyncio.TaskGroup() as group:
                for descriptor in blobs:
                    group.create_task(one(descriptor))
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None  # the first real failure, not a group
        await self._manifest()
        return self._report

    # ---- blobs ----------------------------------------------------------------------------
    async def _blob(self, descriptor: Descriptor) -> None:
        digest = descriptor.digest
        head = await self._retrying(f"checking blob {digest}", lambda: self._request(
            "HEAD", f"{self._repo}/blobs/{digest}"))
        if head.status == 200:
            self._report.existing.append(digest)
            self._said(descriptor, descriptor.size)
            return
        self._require(head, {404}, f"checking for blob {digest}")
        await asyncio.to_thread(self._store.blobs.verify, digest)  # send only what it names
        location = await self._mount_or_open(digest)
        if location is None:
            self._report.mounted.append(digest)
            self._said(descriptor, descriptor.size)
            return
        location = await self._send_chunks(descriptor, location)
        closed = await self._request("PUT", _with_digest(location, digest),
                                     headers={"Content-Length": "0"})
        self._require(closed, {201}, f"closing the upload of blob {digest}")
        self._report.uploaded.append(digest)

    async def _mount_or_open(self, digest: str) -> str | None:
        """Mount ``digest`` from a repository of the same registry the image came from
        (None: mounted), else the ``Location`` of a new upload session."""
        uploads = f"{self._repo}/blobs/uploads/"
        for source in self._mount_sources():
            mount = {"mount": digest, "from": source}
            reply = await self._retrying(f"mounting blob {digest}", functools.partial(
                self._request, "POST", uploads, params=mount))
            if reply.status == 201:
                return None
            if reply.status == 202:  # not mounted (e.g. no access there): an upload instead
                return self._location(reply)
        return await self._open_upload(digest)

    async def _open_upload(self, digest: str) -> str:
        """The ``Location`` of a new upload session for ``digest``."""
        reply = await self._retrying(f"starting the upload of blob {digest}", lambda:
                                     self._request("POST", f"{self._repo}/blobs/uploads/"))
        self._require(reply, {202}, f"starting the upload of blob {digest}")
        return self._location(reply)

    def _mount_sources(self) -> list[str]:
        target = self._target
        sources = []
        for tag in self._image.tags:
            ref = ImageReference.parse(tag)
            if registry_host_key(ref.registry) == registry_host_key(target.registry) \
                    and ref.repository != target.repository:
                sources.append(ref.repository)
        return sorted(set(sources))

    async def _send_chunks(self, descriptor: Descriptor, location: str) -> str:
        """Send the blob into the upload session at ``location``; its last ``Location``."""
        digest, size = descriptor.digest, descriptor.size
        path = self._store.blobs.path(digest)
        offset, failures = 0, 0
        while offset < size:
            chunk = await asyncio.to_thread(_read_at, path, offset, self._chunk_bytes)
            last = offset + len(chunk) - 1
            try:
                reply = await self._request("PATCH", location, content=chunk, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{last}", "Content-Length": str(len(chunk))})
                if reply.status in _RETRIABLE_STATUS or reply.status == 416:
                    raise RegistryError(f"registry answered {reply.status} to a chunk of "
                                        f"blob {digest}{reply.error_detail()}", retriable=True)
                self._require(reply, {202}, f"sending blob {digest}")
            except RegistryError as exc:
                failures += 1
                if not exc.retriable or failures >= self._client.retry_policy.attempts:
                    raise
                await self._client.sleep(self._client.retry_policy.delay(failures))
                held, location = await self._resume_point(digest, location)
                # A registry commits whole chunks: it holds the failed one, or not (it says
                # "0-0" for nothing held too); anything else, start over in a new session.
                if held == last + 1:
                    offset = held
                elif held < offset or held > last + 1:
                    offset, location = 0, await self._open_upload(digest)
                continue
            location = self._location(reply)
            offset = _range_end(reply, last) + 1
            self._report.bytes_sent += len(chunk)
            self._said(descriptor, offset)
        return location

    async def _resume_point(self, digest: str, location: str) -> tuple[int, str]:
        """Where to go on after a failed chunk: how much of the upload at ``location`` the
        registry holds, or, when it no longer knows that session (distribution's registry
        refuses a ``Location`` whose recorded offset is stale: the lost chunk did arrive),
        the start of a new one."""
        reply = await self._retrying(f"asking how much of blob {digest} arrived",
                                     lambda: self._request("GET", location))
        if reply.status == 204:
            match = _RANGE.match(reply.headers.get("range", ""))
            return (int(match.group(1)) + 1 if match else 0), self._location(reply, location)
        if reply.status in (400, 404, 416):
            return 0, await self._open_upload(digest)
        self._require(reply, {204}, f"asking how much of blob {digest} arrived")
        raise AssertionError("unreachable: _require raised")

    # ---- the manifest ---------------------------------------------------------------------
    async def _manifest(self) -> None:
        image, target = self._image, self._target
        data = await asyncio.to_thread(self._store.blobs.read_bytes, image.digest)
        where = target.digest or target.tag or "latest"
        reply = await self._retrying(f"putting the manifest of {target}", lambda: self._request(
            "PUT", f"{self._repo}/manifests/{where}", content=data,
            headers={"Content-Type": image.media_type}))
        self._require(reply, {201}, f"putting the manifest of {target}")
        served = reply.headers.get("docker-content-digest")
        if served and served != image.digest:
            raise RegistryError(f"registry {target.registry} stored the manifest of {target} "
                                f"as {served}, not {image.digest}: it changed the document")
        self._report.reference = f"{dataclasses.replace(target, digest=None)}@{image.digest}"

    # ---- plumbing -------------------------------------------------------------------------
    async def _request(self, method: str, url: str, *, content: bytes | None = None,
                       headers: Mapping[str, str] | None = None,
                       params: Mapping[str, str] | None = None) -> RegistryReply:
        if params:
            url = str(httpx.URL(url).copy_merge_params(dict(params)))
        return await self._client.request(self._target, method, url, headers=headers,
                                          content=content, push=True)

    async def _retrying(self, what: str,
                        call: Callable[[], Awaitable[RegistryReply]]) -> RegistryReply:
        async def attempt() -> RegistryReply:
            reply = await call()
            if reply.status in _RETRIABLE_STATUS:
                raise RegistryError(f"{what}: registry {self._target.registry} answered "
                                    f"{reply.status}{reply.error_detail()}", retriable=True)
            return reply
        return await self._client.retrying(what, attempt)

    def _require(self, reply: RegistryReply, expected: set[int], what: str) -> None:
        if reply.status in expected:
            return
        target = self._target
        if reply.status in (401, 403):
            raise RegistryError(f"{what}: registry {target.registry} denied pushing to "
                                f"{target.repository} ({reply.status}){reply.error_detail()}: "
                                "check that these credentials may push there")
        raise RegistryError(f"{what}: registry {target.registry} answered {reply.status} "
                            f"(expected {', '.join(map(str, sorted(expected)))})"
                            f"{reply.error_detail()}")

    def _location(self, reply: RegistryReply, default: str | None = None) -> str:
        location = reply.headers.get("location") or default
        if not location:
            raise RegistryError(f"registry {self._target.registry} answered {reply.status} "
                                "without the upload's Location")
        return str(httpx.URL(reply.url).join(location))

    def _said(self, descriptor: Descriptor, done: int) -> None:
        if self._progress is not None:
            self._progress(descriptor.digest, done, descriptor.size)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def _range_end(reply: RegistryReply, sent_last: int) -> int:
    """The last byte the registry says it holds (``Range: 0-N``), else the one just sent."""
    match = _RANGE.match(reply.headers.get("range", ""))
    return int(match.group(1)) if match else sent_last


def _with_digest(location: str, digest: str) -> str:
    return str(httpx.URL(location).copy_merge_params({"digest": digest}))
