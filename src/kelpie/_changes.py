"""A version number that grows at every change, and a way to wait for the next change:
what lets a watcher (a followed list on the REST API) be woken by changes, not a timer."""

from __future__ import annotations

import asyncio


class Changes:
    """Counts changes; :meth:`wait` returns once there was one after the version given."""

    def __init__(self) -> None:
        self.version = 0
        self._bumped = asyncio.Event()

    def bump(self) -> None:
        """Something changed: wake every waiter."""
        self.version += 1
        self._bumped.set()
        self._bumped = asyncio.Event()  # the waiters of the old one all wake

    async def wait(self, since: int) -> int:
        """Wait until something changed after version ``since``; the version now."""
        while self.version == since:
            await self._bumped.wait()
        return self.version
