"""AgentConnection: one byte stream to one guest agent, its requests multiplexed over it.

A single reader task decodes frames and hands each to the queue of the request it belongs
to (:class:`Pending`), so any number of requests run concurrently over the one stream.
A new agent behind the same stream (the guest killed the agent and its init started
another: over virtio-serial the host's socket does not notice) answers the first request
it gets with ``EPROTO: send hello first``. The connection then knows every open request
belonged to the old agent: they fail with :class:`AgentRestarted` (the refused one with
``refused=True``: it never ran) and the state is CONNECTED again, for a new hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kelpie import protocol
from kelpie.agent._errors import AgentDisconnected, AgentProtocolError, AgentRestarted
from kelpie.agent._handle import Pending, decode
from kelpie.agent._types import AgentInfo, ClientState
from kelpie.protocol import FrameType

logger = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
NO_SESSION = ("EPROTO", "send hello first")
"""The agent's answer to a request before any hello (``guest`` agent, ``on_request``): from
a client that did say hello, it means a new agent answers."""


def is_no_session(body: dict[str, Any]) -> bool:
    """Whether an ERROR body is the agent's "send hello first" refusal."""
    return body.get("code") == NO_SESSION[0] and NO_SESSION[1] in str(body.get("message"))


class AgentConnection:
    """Requests multiplexed over one stream to an agent, and how the stream ends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, Pending] = {}
        self._next_id = 1
        self._state = ClientState.CONNECTED
        self._lost: AgentDisconnected | None = None
        self.info: AgentInfo | None = None
        """The agent's hello reply (None before hello and after the agent restarted)."""
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="kelpie-agent-reader"
        )

    @property
    def state(self) -> ClientState:
        """Lifecycle state."""
        return self._state

    @property
    def open_requests(self) -> int:
        """How many requests wait for an answer (an exec counts until it exits)."""
        return len(self._pending)

    async def close(self) -> None:
        """Close the stream; pending requests fail with AgentDisconnected."""
        self._state = ClientState.CLOSED
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        await self._reader_task

# -- plumbing ----------------------------------------------------------------------

    def _allocate_id(self) -> int:
        while True:
            rid = self._next_id
            self._next_id = rid % protocol.MAX_REQUEST_ID + 1
            if rid not in self._pending:
                return rid

    async def _open(self, op: str, fields: dict[str, Any], *, state_ok: bool = False) -> Pending:
        """Send a request; return the queue its frames will arrive on."""
        if self._lost is not None:
            raise AgentDisconnected(f"{op}: {self._lost}")
        if self._state is not ClientState.READY and not state_ok:
            if self._state is ClientState.CLOSED:
                raise AgentDisconnected(f"{op}: the agent client is closed")
            raise AgentProtocolError(f"{op}: call hello() before any other request")
        pending = Pending(op, self._allocate_id())
        frame = protocol.encode_json(FrameType.REQUEST, pending.request_id, {"op": op, **fields})
        self._pending[pending.request_id] = pending
        try:
            await self._send(frame)
        except BaseException:
            self._pending.pop(pending.request_id, None)
            raise
        return pending

    async def _call(self, op: str, *, _state_ok: bool = False, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its REPLY body."""
        pending = await self._open(op, fields, state_ok=_state_ok)
        try:
            return await pending.reply()
        finally:
            self._pending.pop(pending.request_id, None)

    def _abandon(self, pending: Pending, *, cancel: bool) -> None:
        """Stop listening for a request; ``cancel`` tells the agent to drop it too.

        A request whose terminal frame arrived is already gone: then no-op.
        """
        if self._pending.pop(pending.request_id, None) is None or not cancel:
            return
        if self._lost is None and self._state is not ClientState.CLOSED:
            # Fire and forget (no drain): this runs during cancellation too.
            cancel_id = self._allocate_id()
            self._writer.write(
                protocol.encode_json(
                    FrameType.REQUEST, cancel_id, {"op": "cancel", "target": pending.request_id}
                )
            )

    async def _send(self, frame: bytes) -> None:
        if self._lost is not None:
            raise AgentDisconnected(str(self._lost))
        if self._state is ClientState.CLOSED:
            raise AgentDisconnected("the agent client is closed")
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except ConnectionError as exc:
            raise AgentDisconnected(f"writing to the agent failed: {exc!r}") from exc

    async def _read_loop(self) -> None:
        """Demultiplex frames to their requests until the stream ends."""
        decoder = protocol.FrameDecoder()
        reason = "the agent closed the connection"
        try:
            while data := await self._reader.read(READ_SIZE):
                decoder.feed(data)
                for item in decoder.frames():
                    self._route(item)
        except (ConnectionError, OSError) as exc:
            reason = f"reading from the agent failed: {exc!r}"
        except asyncio.CancelledError:
            reason = "the agent client was cancelled"
            raise
        finally:
            if self._state is ClientState.CLOSED:
                reason = "the agent client was closed"
            self._fail_all(AgentDisconnected(reason))
            self._writer.close()  # release the socket even if close() is never called

    def _route(self, item: protocol.Frame | protocol.Garbage) -> None:
        if isinstance(item, protocol.Garbage):
            logger.warning("agent stream: skipped %d bytes (%s)", item.skipped, item.reason)
            return
        if item.request_id == 0:
            logger.warning("agent reported a connection-level problem: %r", item.payload[:500])
            return
        pending = self._pending.get(item.request_id)
        if pending is None:
            logger.debug("dropping %r: no open request", item)
            return
        if item.ftype in (FrameType.REPLY, FrameType.ERROR):
            del self._pending[item.request_id]
        if item.ftype == FrameType.ERROR and self._state is ClientState.READY:
            with contextlib.suppress(AgentProtocolError):
                if is_no_session(decode(item)):
                    self._session_lost(pending)
                    return
        pending.queue.put_nowait(item)

    def _session_lost(self, refused: Pending) -> None:
        """A new agent refused ``refused`` for want of a hello: the old agent is gone."""
        old = self.info.agent_pid if self.info is not None else "?"
        reason = (
            f"the guest agent (pid {old}) was replaced by a new one (it answered "
            f"{refused.op!r} with 'send hello first'): the agent was killed or exited, "
            f"and the guest's init restarted it"
        )
        logger.warning("%s", reason)
        self._state = ClientState.CONNECTED
        self.info = None
        refused.queue.put_nowait(AgentRestarted(f"{refused.op}: {reason}", refused=True))
        lost, self._pending = self._pending, {}
        for request in lost.values():
            request.queue.put_nowait(AgentRestarted(f"{request.op}: {reason}"))

    async def wait_closed(self) -> None:
        """Wait until the stream has ended (closed by either side) and requests have failed."""
        await asyncio.shield(self._reader_task)

    def abort(self, reason: str) -> None:
        """Give the agent up: every open request fails with ``reason``, the stream closes."""
        self._fail_all(AgentDisconnected(reason))
        self._writer.close()

    def _fail_all(self, error: AgentDisconnected) -> None:
        self._lost = self._lost or error  # the first reason is the one worth telling
        self._state = ClientState.CLOSED
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.queue.put_nowait(error)
