"""Sandbox timeouts: a sandbox given one is removed, stopped or paused once it passes
(E2B's sandboxes are killed or paused at their timeout; programs written for it rely on
that to not leak sandboxes)."""

from __future__ import annotations

import asyncio
import dataclasses

from kelpie.runtime._arguments import label, on_timeout_action, timeout_seconds
from kelpie.runtime._context import RuntimeContext, logger
from kelpie.runtime._info import SandboxInfo
from kelpie.runtime._sandboxes import Sandboxes
from kelpie.vm import KelpieError, VmState

HELD_RETRY_SECONDS = 1.0
"""How soon a sandbox whose timeout passed while a move held it is looked at again."""


class Expiries:
    """Watches the sandboxes' timeouts and ends each one whose timeout passed, as its
    ``on_timeout`` says, from one task that sleeps until the earliest."""

    def __init__(self, ctx: RuntimeContext, sandboxes: Sandboxes) -> None:
        self._ctx = ctx
        self._sandboxes = sandboxes
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def set(self, info: SandboxInfo, seconds: float | None,
            on_timeout: str | None = None, *, extend_only: bool = False) -> SandboxInfo:
        """Give the sandbox a timeout ``seconds`` from now (None: none), replacing any it
        had; ``on_timeout`` (default: as before) says what then happens to it. With
        ``extend_only`` a timeout is only ever moved later (none stays none)."""
        ctx = self._ctx
        seconds = timeout_seconds(seconds)
        info = ctx.info(info.id)  # the latest record: its config is written back whole
        now = ctx.clock()
        expires_at = None if seconds is None else now + seconds
        if extend_only and (info.expires_at is None or expires_at is None or
                            info.expires_at >= expires_at):
            return info
        action = info.on_timeout if on_timeout is None else on_timeout_action(on_timeout)
        changed = dataclasses.replace(info, expires_at=expires_at, on_timeout=action)
        ctx.db.set_config(changed, now)
        self._changed.set()
        return ctx.info(info.id)

    def resume(self) -> None:
        """At open: watch the timeouts (those that passed while no runtime ran end now)."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="kelpie-expiries")

    def cancel(self) -> None:
        """Stop watching (the watcher ends on the loop's next turns)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """Stop watching, and return once the watcher has ended: a closed runtime leaves
        no task of its own behind on the loop."""
        task = self._task
        self.cancel()
        if task is not None:
            await asyncio.wait([task])

    async def _watch(self) -> None:
        ctx = self._ctx
        while ctx.open_db is not None:
            self._changed.clear()
            now = ctx.clock()
            pending = [info for info in ctx.db.all() if info.expires_at is not None]
            waits = []
            for info in pending:
                assert info.expires_at is not None
                if info.expires_at > now:
                    waits.append(info.expires_at - now)
                elif ctx.held.get(info.id) is not None:
                    waits.append(HELD_RETRY_SECONDS)  # a move decides first where it lives
                else:
                    await self._expire(info)
            if not waits and pending:
                continue  # some expired just now: look again before sleeping
            await self._sleep(min(waits, default=None))

    async def _sleep(self, seconds: float | None) -> None:
        """Until ``seconds`` passed (None: forever) or a timeout changed."""
        changed = asyncio.ensure_future(self._changed.wait())
        waits: set[asyncio.Future[object]] = {changed}  # type: ignore[arg-type]
        if seconds is not None:
            waits.add(asyncio.ensure_future(self._ctx.sleep(seconds)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.wait(waits)  # ended, not merely told to

    async def _expire(self, info: SandboxInfo) -> None:
        """End one sandbox whose timeout passed; its timeout is then gone (a failure is
        recorded as the sandbox's last error, never retried in a loop)."""
        ctx = self._ctx
        latest = ctx.db.get(info.id)
        if latest is None or latest.expires_at != info.expires_at:
            return  # removed, or given another timeout, meanwhile
        info = latest
        why = f"its timeout passed ({info.on_timeout})"
        logger.info("sandbox %s: %s", label(info), why)
        try:
            if info.on_timeout == "remove":
                await self._sandboxes.remove(info.id, force=True)
                return
            ctx.db.set_config(dataclasses.replace(info, expires_at=None), ctx.clock())
            if info.on_timeout == "pause" and info.state is VmState.RUNNING:
                await self._sandboxes.pause(info.id)
            elif info.on_timeout == "stop" and info.state in (VmState.RUNNING, VmState.PAUSED):
                await self._sandboxes.stop(info.id, timeout=None)
        except KelpieError as exc:
            logger.warning("sandbox %s: %s, but ending it failed: %s", label(info), why, exc)
            if ctx.db.get(info.id) is not None:
                ctx.db.set_config(dataclasses.replace(ctx.info(info.id), expires_at=None),
                                  ctx.clock())
                ctx.db.set_error(info.id, f"{why}, but ending it failed: {exc}", ctx.clock())
