"""Ending a task we started without losing the cancellation of the task that ends it."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; its own outcome is ignored.

    ``suppress(CancelledError)`` around ``await task`` would also swallow the cancellation
    of the caller arriving during the wait; :func:`asyncio.wait` does not raise the task's
    outcome, so the caller's cancellation (and only it) propagates.
    """
    task.cancel()
    task.add_done_callback(_ignore_outcome)
    await asyncio.wait({task})


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved
