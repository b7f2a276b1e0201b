"""Both sides of teleport for one daemon: :class:`TeleportHost`.

It owns the daemon's :class:`TeleportJournal` (opened on first use, in the runtime's data
directory), the :class:`Teleporter` that sends sandboxes away and the
:class:`TeleportReceiver` that takes them in, and the upkeep a daemon runs: recovery when
it starts, then every ``upkeep_seconds`` the receiver's leases and another try at
settling teleports left in doubt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kelpie._exceptions import KelpieError
from kelpie.runtime import Runtime
from kelpie.teleport._flights import Flights
from kelpie.teleport._journal import TeleportJournal
from kelpie.teleport._peer import DaemonPeer, TeleportPeer
from kelpie.teleport._source import Teleporter
from kelpie.teleport._target import Offload, TeleportReceiver, _to_thread
from kelpie.teleport._transfer import ATTEMPTS, CHUNK_SIZE
from kelpie.vm import PortMapping

JOURNAL_FILENAME = "teleports.db"
"""The journal's file name in a daemon's data directory."""
UPKEEP_SECONDS = 30.0

log = logging.getLogger("kelpie.teleport")


def _daemon_peer(url: str, token: str | None) -> TeleportPeer:
    return DaemonPeer(url, token=token)


class TeleportHost:
    """The teleport journal, coordinator and receiver of one daemon's runtime.

    Everything the two sides act through is a parameter, so the simulator drives this very
    code: ``connect`` (the transport), ``clock``, ``new_id``, ``sleep``, ``offload``
    (blocking work), ``journal`` (default: ``teleports.db`` in the runtime's directory),
    ``check_ports``; ``chunk_size`` and ``attempts`` tune the transfer.
    """

    def __init__(self, runtime: Runtime, *,
                 connect: Callable[[str, str | None], TeleportPeer] = _daemon_peer,
                 clock: Callable[[], float] = time.time,
                 new_id: Callable[[], str] = lambda: secrets.token_hex(8),
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 offload: Offload[Any] = _to_thread,
                 journal: TeleportJournal | None = None,
                 check_ports: Callable[[list[PortMapping]], list[str]] | None = None,
                 chunk_size: int = CHUNK_SIZE, attempts: int = ATTEMPTS,
                 upkeep_seconds: float = UPKEEP_SECONDS) -> None:
        self._runtime = runtime
        self._upkeep_seconds = upkeep_seconds
        self._sleep = sleep
        self._journal = journal
        self.flights = Flights(clock)
        """The teleports this daemon is sending now (read without opening the journal)."""
        self._make_teleporter: Callable[[], Teleporter] = lambda: Teleporter(
            runtime, self.journal, connect=connect, clock=clock, new_id=new_id, sleep=sleep,
            offload=offload, chunk_size=chunk_size, attempts=attempts, flights=self.flights)
        self._make_receiver: Callable[[], TeleportReceiver] = lambda: TeleportReceiver(
            runtime, self.journal, clock=clock, offload=offload, check_ports=check_ports)
        self._upkeep: asyncio.Task[None] | None = None

    # (made on first use: a daemon that never teleports opens no journal)
    @functools.cached_property
    def teleporter(self) -> Teleporter:
        return self._make_teleporter()

    @functools.cached_property
    def receiver(self) -> TeleportReceiver:
        return self._make_receiver()

    @property
    def journal(self) -> TeleportJournal:
        if self._journal is None:
            self._journal = TeleportJournal(self._runtime.data_dir / JOURNAL_FILENAME)
        return self._journal

    async def open(self, *, upkeep: bool = True) -> None:
        """Finish or roll back what a crash interrupted, then (``upkeep``) keep it up every
        ``upkeep_seconds``."""
        try:
            await self.receiver.recover()
        except KelpieError as exc:
            log.warning("teleport recovery (target side) is not complete: %s", exc)
        doubtful = await self.teleporter.recover()
        for teleport_id in doubtful:
            log.warning("teleport %s is in doubt: its sandbox stays held here until the "
                        "target answers", teleport_id)
        if upkeep:
            self._upkeep = asyncio.create_task(self._keep_up(), name="kelpie-teleport-upkeep")

    async def upkeep_once(self) -> None:
        """One round: end the receiver's expired leases, settle stuck teleports."""
        await self.receiver.expire()
        for record in self.teleporter.stuck():
            with contextlib.suppress(KelpieError):  # still in doubt: next round
                await self.teleporter.settle(record)

    async def _keep_up(self) -> None:
        while True:
            await self._sleep(self._upkeep_seconds)
            try:
                await self.upkeep_once()
            except Exception:  # the upkeep must outlive one bad round
                log.exception("teleport upkeep failed; trying again in %s s",
                              self._upkeep_seconds)

    async def close(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        if self._journal is not None:
            self._journal.close()
            self._journal = None
