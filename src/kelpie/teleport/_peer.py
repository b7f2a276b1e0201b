"""The target as a teleport's source sees it: :class:`TeleportPeer`.

Two things implement it: :class:`DaemonPeer` (another daemon, over its REST API with its
token) and, in the simulator, the target's :class:`~kelpie.teleport.TeleportReceiver`
behind a simulated link. A request that gets no answer raises
:class:`~kelpie.PeerUnreachable`: it may or may not have been carried out, which is
why every step is idempotent and can be asked about (:meth:`TeleportPeer.state`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from kelpie.api import (
    HostFacts,
    TeleportAccepted,
    TeleportLive,
    TeleportOffer,
    TeleportState,
    TeleportSwitch,
)
from kelpie.client import DaemonClient
from kelpie.teleport._relay import Channel


class TeleportPeer(Protocol):
    """The steps a target offers a source; every one may be repeated safely."""

    @property
    def address(self) -> str: ...

    async def facts(self) -> HostFacts: ...

    async def prepare(self, offer: TeleportOffer) -> TeleportAccepted: ...

    async def received(self, teleport_id: str, name: str) -> int: ...

    async def put_chunk(self, teleport_id: str, name: str, offset: int, data: bytes, *,
                        size: int, sha256: str) -> int: ...

    async def switch(self, teleport_id: str, body: TeleportSwitch) -> TeleportState: ...

    async def live_start(self, teleport_id: str, body: TeleportLive) -> TeleportState: ...

    def open_channel(self, teleport_id: str,
                     name: str) -> AbstractAsyncContextManager[Channel]: ...

    async def commit(self, teleport_id: str) -> TeleportState: ...

    async def abort(self, teleport_id: str) -> TeleportState: ...

    async def state(self, teleport_id: str) -> TeleportState: ...


class DaemonPeer:
    """A target daemon reached over its REST API (see :class:`kelpie.client.DaemonClient`)."""

    def __init__(self, url: str, *, token: str | None = None) -> None:
        self.address = url
        self._client = DaemonClient(url, token=token)
        self._target = self._client.teleport_target

    async def close(self) -> None:
        await self._client.close()

    async def facts(self) -> HostFacts:
        return await self._client.host_facts()

    async def prepare(self, offer: TeleportOffer) -> TeleportAccepted:
        return await self._target.prepare(offer)

    async def received(self, teleport_id: str, name: str) -> int:
        return await self._target.received(teleport_id, name)

    async def put_chunk(self, teleport_id: str, name: str, offset: int, data: bytes, *,
                        size: int, sha256: str) -> int:
        return await self._target.put_chunk(teleport_id, name, offset, data,
                                                      size=size, sha256=sha256)

    async def switch(self, teleport_id: str, body: TeleportSwitch) -> TeleportState:
        return await self._target.step(teleport_id, "switch", body)

    async def live_start(self, teleport_id: str, body: TeleportLive) -> TeleportState:
        return await self._target.step(teleport_id, "live", body)

    @contextlib.asynccontextmanager
    async def open_channel(self, teleport_id: str, name: str) -> AsyncIterator[Channel]:
        async with self._target.channel(teleport_id, name) as ws:
            yield _WebSocketChannel(ws)

    async def commit(self, teleport_id: str) -> TeleportState:
        return await self._target.step(teleport_id, "commit")

    async def abort(self, teleport_id: str) -> TeleportState:
        return await self._target.step(teleport_id, "abort")

    async def state(self, teleport_id: str) -> TeleportState:
        return await self._target.state(teleport_id)


class _WebSocketChannel:
    """A :class:`Channel` over a WebSocket of binary messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def send(self, data: bytes) -> None:
        await self._ws.send(data)

    async def receive(self) -> bytes:
        try:
            message = await self._ws.recv()
        except ConnectionClosed:
            return b""
        return message if isinstance(message, bytes) else message.encode()
