"""The shared waiting helpers: they return what the condition gave, and a wait that runs
out says what did not happen."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from waiting import WaitTimeout, wait_for, wait_until


def test_wait_for_returns_the_first_true_value() -> None:
    looks = itertools.count()
    assert wait_for(lambda: next(looks) >= 2 and "ready", 30, "the third look", interval=0) \
        == "ready"


def test_wait_for_says_what_did_not_happen() -> None:
    with pytest.raises(WaitTimeout, match=r"waiting for the daemon to exit \(last seen: 0\)"):
        wait_for(lambda: 0, 0, "the daemon to exit")


async def test_wait_until_awaits_async_predicates_and_lets_the_loop_run() -> None:
    done = asyncio.Event()
    asyncio.get_running_loop().call_soon(done.set)

    async def is_done() -> bool:
        return done.is_set()

    assert await wait_until(is_done, 30, "the callback") is True
    assert await wait_until(done.is_set, 30, "the callback") is True
    with pytest.raises(WaitTimeout, match="waiting for nothing"):
        await wait_until(lambda: None, 0, "nothing")

