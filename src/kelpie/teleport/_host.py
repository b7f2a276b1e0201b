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
import logging
import secrets
import time
from collections.abc import Callable

from kelpie._exceptions import KelpieError
from kelpie.runtime import Runtime
from kelpie.teleport._journal import TeleportJournal
from kelpie.teleport._peer import DaemonPeer, TeleportPeer
from kelpie.teleport._source import Teleporter
from kelpie.teleport._target import TeleportReceiver

JOURNAL_FILENAME = "teleports.db"
"""The journal's file name in a daemon's data directory."""
UPKEEP_SECONDS = 30.0

log = logging.getLogger("kelpie.teleport")


def _daemon_peer(url: str, token: str | None) -> TeleportPeer:
    return DaemonPeer(url, token=token)


class TeleportHost:
    """The teleport journal, coordinator and receiver of one daemon's runtime."""

    def __init__(self, runtime: Runtime, *,
                 connect: Callable[[str, str | None], TeleportPeer] = _daemon_peer,
                 clock: Callable[[], float] = time.time,
                 upkeep_seconds: float = UPKEEP_SECONDS) -> None:
        self._runtime = runtime
        self._connect = connect
        self._clock = clock
        self._upkeep_seconds = upkeep_seconds
        self._journal: TeleportJournal | None = None
        self._teleporter: Teleporter | None = None
        self._receiver: TeleportReceiver | None = None
        self._upkeep: asyncio.Task[None] | None = None

    @property
    def journal(self) -> TeleportJournal:
        if self._journal is None:
            self._journal = TeleportJournal(self._runtime.data_dir / JOURNAL_FILENAME)
        return self._journal

    @property
    def teleporter(self) -> Teleporter:
        if self._teleporter is None:
            self._teleporter = Teleporter(
                self._runtime, self.journal, connect=self._connect, clock=self._clock,
                new_id=lambda: secrets.token_hex(8))
        return self._teleporter

    @property
    def receiver(self) -> TeleportReceiver:
        if self._receiver is None:
            self._receiver = TeleportReceiver(self._runtime, self.journal, clock=self._clock)
        return self._receiver

    async def open(self) -> None:
        """Finish or roll back what a crash interrupted, then start the upkeep."""
        await self.receiver.recover()
        doubtful = await self.teleporter.recover()
        for teleport_id in doubtful:
            log.warning("teleport %s is in doubt: its sandbox stays paused here until the "
                        "target answers", teleport_id)
        self._upkeep = asyncio.create_task(self._keep_up(), name="kelpie-teleport-upkeep")

    async def _keep_up(self) -> None:
        while True:
            await asyncio.sleep(self._upkeep_seconds)
            try:
                await self.receiver.expire()
                for record in self.teleporter.pending():
                    if record.error is not None:  # in doubt (one in progress has none)
                        with contextlib.suppress(KelpieError):
                            await self.teleporter.settle(record)
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
