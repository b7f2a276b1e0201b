"""Virtual time for asyncio: sleeps and timeouts take no wall time.

:class:`SimEventLoop` is an ordinary asyncio loop whose clock is a :class:`VirtualClock`
counted in integer nanoseconds. When every task is blocked, the loop jumps the clock
straight to the next timer (trio's ``autojump_threshold=0``). If nothing is ready and no
timer is pending the simulation is deadlocked, and :class:`SimulationDeadlock` says so
instead of hanging. Ready callbacks are run in an order drawn from the seeded RNG, so a
seed explores one interleaving and the same seed always explores the same one.

Only for simulations with in-memory I/O: reordering ready callbacks is not safe for real
sockets (asyncio transports rely on FIFO ``call_soon`` order).
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from kelpie.sim._rng import SimRng

T = TypeVar("T")

DEFAULT_EPOCH_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z: a fixed, readable epoch


class SimulationDeadlock(RuntimeError):
    """Every task waits and no timer is pending: the simulation can never make progress."""


class VirtualClock:
    """Monotonic and wall time for a simulation, in integer nanosecond ticks."""

    def __init__(self, epoch_ns: int = DEFAULT_EPOCH_NS) -> None:
        self.ticks = 0
        self.epoch_ns = epoch_ns

    def monotonic(self) -> float:
        """Seconds since the simulation began."""
        return self.ticks / 1e9

    def wall(self) -> float:
        """Simulated Unix time in seconds."""
        return (self.epoch_ns + self.ticks) / 1e9

    def advance(self, seconds: float) -> None:
        """Move time forward (rounded up to whole ticks so a timer is always reached)."""
        if seconds > 0:
            self.ticks += math.ceil(seconds * 1e9)


class _VirtualSelector(selectors.BaseSelector):
    """Polls real fds without blocking (the loop's self-pipe), then jumps virtual time."""

    def __init__(self, clock: VirtualClock, rng: SimRng | None) -> None:
        self._real = selectors.DefaultSelector()
        self._clock = clock
        self._rng = rng
        self.loop: SimEventLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events:
            return events
        if timeout is None:
            raise SimulationDeadlock(
                "every task is waiting and no timer is pending (deadlock in the simulation)"
            )
        self._clock.advance(timeout)
        self._shuffle_ready()
        return []

    def _shuffle_ready(self) -> None:
        # asyncio keeps ready callbacks in ``loop._ready``; the order in which independent
        # tasks run is exactly what a seed should choose. Private, hence isolated here.
        ready = getattr(self.loop, "_ready", None)
        if self._rng is not None and ready is not None and len(ready) > 1:
            items = list(ready)
            self._rng.shuffle(items)
            ready.clear()
            ready.extend(items)


class SimEventLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on a :class:`VirtualClock`."""

    def __init__(self, clock: VirtualClock, rng: SimRng | None = None) -> None:
        selector = _VirtualSelector(clock, rng)
        super().__init__(selector)
        selector.loop = self
        self.clock = clock

    def time(self) -> float:
        return self.clock.monotonic()


def run_simulated(
    main: Coroutine[Any, Any, T], *, clock: VirtualClock, rng: SimRng | None = None
) -> T:
    """Run ``main`` to completion on a fresh :class:`SimEventLoop`."""
    with asyncio.Runner(loop_factory=lambda: SimEventLoop(clock, rng)) as runner:
        return runner.run(main)
