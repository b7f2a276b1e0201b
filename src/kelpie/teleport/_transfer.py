"""Moving files to a teleport's target: chunked, checked, resumed; and retrying a request.

Every blob goes in chunks of ``chunk_size`` bytes, each a request of its own carrying the
blob's size and sha256 (the peer adds the chunk's own sha256, checked on arrival). A chunk
sent for the wrong offset is answered with where the target stands; a damaged one is sent
again; a dropped connection is resumed from what the target holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from kelpie._exceptions import PeerUnreachable, SnapshotCorrupted, TransferOffsetMismatch
from kelpie.api import TeleportProgress
from kelpie.teleport._peer import TeleportPeer
from kelpie.vm import Storage

T = TypeVar("T")

CHUNK_SIZE = 16 << 20
"""Bytes per chunk: each is one request, checked by its sha256 on arrival."""
ATTEMPTS = 5
"""Tries of one request before the target counts as unreachable (the steps are idempotent)."""
RETRY_DELAY = 0.5
"""Seconds before the first retry; doubled for each one after it."""

Sleep = Callable[[float], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class Blob:
    """One file a teleport sends: its name on the target, where it is here, size, sha256."""

    name: str
    path: Path
    size: int
    sha256: str


class Retry:
    """Runs an idempotent request again while the peer does not answer (backing off)."""

    def __init__(self, attempts: int, sleep: Sleep) -> None:
        self.attempts = attempts
        self.sleep = sleep

    async def __call__(self, step: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await step()
            except PeerUnreachable:
                if attempt == self.attempts - 1:
                    raise
                await self.sleep(RETRY_DELAY * (2 ** attempt))
        raise AssertionError("unreachable")


class BlobSender:
    """Sends the blobs of one teleport to its target; counts the bytes that went."""

    def __init__(self, storage: Storage, peer: TeleportPeer, teleport_id: str, *,
                 retry: Retry, chunk_size: int = CHUNK_SIZE,
                 progress: Callable[[TeleportProgress], None]) -> None:
        self._storage = storage
        self._peer = peer
        self._id = teleport_id
        self._retry = retry
        self._chunk_size = chunk_size
        self._progress = progress
        self.bytes_sent = 0

    async def send(self, blobs: list[Blob]) -> None:
        total = sum(b.size for b in blobs)
        for blob in blobs:
            await self._send(blob, total)

    async def _send(self, blob: Blob, total: int) -> None:
        """Send one blob in chunks, resuming where the target stands after a drop, until
        the target answers that it holds all of it (a blob the target has every byte of but
        had not yet checked and put in place, say after a crash, gets an empty last chunk:
        that finishes it)."""
        peer, tid = self._peer, self._id
        offset = await self._retry(lambda: peer.received(tid, blob.name))
        damaged = dropped = 0
        with self._storage.open_read(blob.path) as source:
            while True:
                source.seek(offset)
                data = source.read(self._chunk_size) if offset < blob.size else b""
                try:
                    held = await peer.put_chunk(tid, blob.name, offset, data, size=blob.size,
                                                sha256=blob.sha256)
                except TransferOffsetMismatch as exc:
                    offset = exc.received
                    continue
                except SnapshotCorrupted:
                    damaged += 1
                    if damaged >= self._retry.attempts:
                        raise
                    offset = await self._retry(lambda: peer.received(tid, blob.name))
                    continue
                except PeerUnreachable:
                    dropped += 1  # in a row, without the target getting further
                    if dropped >= self._retry.attempts:
                        raise
                    await self._retry.sleep(RETRY_DELAY * dropped)
                    now_at = await self._retry(lambda: peer.received(tid, blob.name))
                    if now_at > offset:
                        dropped = 0
                    offset = now_at
                    continue
                dropped = 0
                self.bytes_sent += len(data)
                offset = held
                self._progress(TeleportProgress(phase="transfer", message=blob.name,
                                                done=self.bytes_sent, total=total))
                if held >= blob.size:
                    return


def sha256_of(storage: Storage, path: Path) -> str:
    """The sha256 (hex) of a file read through ``storage`` (blocking: run it off the loop)."""
    digest = hashlib.sha256()
    with storage.open_read(path) as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
