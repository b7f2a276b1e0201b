"""Crashed sandboxes booted again, as their restart policy says (Docker restarts a
container whose process died, and at daemon start one that died while it was down)."""

from __future__ import annotations

import asyncio
import math

from kelpie.runtime._context import RuntimeContext, logger
from kelpie.runtime._restart import RestartPolicy
from kelpie.runtime._sandboxes import Sandboxes
from kelpie.vm import KelpieError, VmState


class CrashRestarts:
    """Boots a sandbox again after its VM crashed, backing off as a main command's
    restarts do; counted like them (``restart_count``, a ``restarted`` event)."""

    def __init__(self, ctx: RuntimeContext, sandboxes: Sandboxes) -> None:
        self._ctx = ctx
        self._sandboxes = sandboxes
        self._tasks: dict[str, asyncio.Task[None]] = {}
        """The restart waiting to boot each sandbox (one at a time)."""
        self._all: set[asyncio.Task[None]] = set()
        self._delays: dict[str, float] = {}
        self._booted: dict[str, float] = {}

    def crashed(self, sandbox_id: str) -> None:
        """A sandbox's VM crashed (called from its state observer): schedule its restart
        if its policy wants one."""
        info = self._ctx.db.get(sandbox_id)
        if info is None or sandbox_id in self._tasks \
                or not info.restart.restarts_after_crash(info.restart_count):
            return
        ran_for = self._ctx.clock() - self._booted.get(sandbox_id, -math.inf)
        delay = RestartPolicy.delay(self._delays.get(sandbox_id), ran_for)
        self._delays[sandbox_id] = delay
        why = (f"VM crashed ({info.crash_reason or 'no reason given'}); restart "
               f"{info.restart_count + 1} ({info.restart}) after {delay:g} s")
        task = asyncio.create_task(self._restart(sandbox_id, delay, why),
                                   name=f"kelpie-restart-{sandbox_id}")
        self._tasks[sandbox_id] = task
        self._all.add(task)
        task.add_done_callback(self._all.discard)
        task.add_done_callback(lambda t: self._tasks.pop(sandbox_id, None)
                               if self._tasks.get(sandbox_id) is t else None)

    def resume(self) -> None:
        """At open: restart the sandboxes found crashed (their VMs died while no runtime
        watched, or their restart was pending when the last one closed)."""
        for info in self._ctx.db.all():
            if info.state is VmState.CRASHED:
                self.crashed(info.id)

    async def _restart(self, sandbox_id: str, delay: float, why: str) -> None:
        ctx = self._ctx
        await ctx.sleep(delay)
        self._tasks.pop(sandbox_id, None)  # a crash from now on is the next one's
        self._booted[sandbox_id] = ctx.clock()
        try:
            await self._sandboxes.restart_crashed(sandbox_id, why)
        except KelpieError as exc:  # never awaited: the record says what happened
            logger.warning("restarting crashed sandbox %s failed: %s", sandbox_id, exc)

    def cancel_all(self) -> None:
        for task in self._all:
            task.cancel()
        self._tasks.clear()
