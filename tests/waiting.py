"""Waiting for something to happen in tests: poll a condition until a deadline, then fail
saying what did not happen.

Tests wait on events where one exists (an ``asyncio.Event``, a future, a process exit).
Where the only way to see a change is to look again (a file appears, another process
answers, a guest counter moves), they poll with these helpers instead of sleeping a guessed
time: the wait ends as soon as the condition holds, and a wait that times out fails with
the message ``what`` (what the test was waiting for), and the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.02
"""Seconds between two looks: short against anything a test waits for, long enough not to
keep a CPU busy."""


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline (an assertion failure of the test)."""


def _timed_out(what: str, timeout: float, last: object) -> WaitTimeout:
    return WaitTimeout(f"timed out after {timeout}s waiting for {what} (last seen: {last!r})")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, *,
             interval: float = POLL_INTERVAL) -> T:
    """Call ``predicate`` until it returns something true and return that, or fail after
    ``timeout`` seconds with a message saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)


async def wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float, what: str, *,
                     interval: float = POLL_INTERVAL) -> T:
    """The async twin of :func:`wait_for`: call (and await, if it is a coroutine function)
    ``predicate`` until its result is true, letting the event loop run in between, or fail
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)

