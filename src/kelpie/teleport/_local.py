"""A target in the same process: :class:`LocalPeer`, for tests and the simulator.

It calls a :class:`TeleportReceiver` directly, through an optional ``link`` hook that may
refuse a request before it is delivered or drop its answer after it was carried out (both
raise :class:`~kelpie.PeerUnreachable`, as a dropped connection does over HTTP).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from kelpie.api import (
    HostFacts,
    TeleportAccepted,
    TeleportLive,
    TeleportOffer,
    TeleportState,
    TeleportSwitch,
)
from kelpie.teleport._relay import Channel, unix_channel
from kelpie.teleport._target import TeleportReceiver

T = TypeVar("T")

Link = Callable[[str, bool], Awaitable[None]]
"""``link(step, delivered)``: called before a request (``delivered`` False) and after it
was carried out (True); raising PeerUnreachable loses the request or its answer."""


async def _perfect(step: str, delivered: bool) -> None:
    return None


class LocalPeer:
    """A :class:`TeleportReceiver` in this process, behind ``link``.

    ``receiver`` may be a function giving the receiver of the moment (a simulated host
    that restarts gets a new one). Every request goes through :meth:`_call`, which a
    subclass may wrap (the simulator turns the target's crash into a dropped connection).
    """

    def __init__(self, receiver: TeleportReceiver | Callable[[], TeleportReceiver], *,
                 address: str = "local", link: Link = _perfect,
                 corrupt: Callable[[bytes], bytes] | None = None) -> None:
        self.address = address
        self._receiver_of = receiver if callable(receiver) else lambda: receiver
        self._link = link
        self._corrupt = corrupt

    @property
    def _receiver(self) -> TeleportReceiver:
        return self._receiver_of()

    async def _call(self, step: str, request: Callable[[], Awaitable[T]]) -> T:
        await self._link(step, False)
        result = await request()
        await self._link(step, True)
        return result

    async def facts(self) -> HostFacts:
        return await self._call("facts", self._receiver.facts)

    async def prepare(self, offer: TeleportOffer) -> TeleportAccepted:
        return await self._call("prepare", lambda: self._receiver.prepare(offer))

    async def received(self, teleport_id: str, name: str) -> int:
        return await self._call("received", lambda: self._receiver.received(teleport_id, name))

    async def put_chunk(self, teleport_id: str, name: str, offset: int, data: bytes, *,
                        size: int, sha256: str) -> int:
        chunk_sha = hashlib.sha256(data).hexdigest()
        arriving = self._corrupt(data) if self._corrupt is not None else data
        return await self._call("put_chunk", lambda: self._receiver.put_chunk(
            teleport_id, name, offset, arriving, size=size, sha256=sha256,
            chunk_sha256=chunk_sha))

    async def switch(self, teleport_id: str, body: TeleportSwitch) -> TeleportState:
        return await self._call("switch", lambda: self._receiver.switch(teleport_id, body))

    async def live_start(self, teleport_id: str, body: TeleportLive) -> TeleportState:
        return await self._call("live_start", lambda: self._receiver.live_start(teleport_id,
                                                                                body))

    @contextlib.asynccontextmanager
    async def open_channel(self, teleport_id: str, name: str) -> AsyncIterator[Channel]:
        await self._link("open_channel", False)
        async with unix_channel(self._receiver.live_socket(teleport_id, name)) as channel:
            yield channel

    async def commit(self, teleport_id: str) -> TeleportState:
        return await self._call("commit", lambda: self._receiver.commit(teleport_id))

    async def abort(self, teleport_id: str) -> TeleportState:
        return await self._call("abort", lambda: self._receiver.abort(teleport_id))

    async def state(self, teleport_id: str) -> TeleportState:
        return await self._call("state", lambda: self._receiver.state(teleport_id))
