"""SimLink: a simulated host <-> guest (or host <-> host) link with network faults."""

from __future__ import annotations

import asyncio

from kelpie._exceptions import NetworkError
from kelpie.sim._faults import NO_FAULTS, Fault, FaultInjector
from kelpie.sim._rng import SimRng

BASE_LATENCY = (0.0002, 0.002)
"""Round-trip time range in seconds for a healthy link (measured: ~0.25 ms under TCG)."""
DELAY_RANGE = (0.05, 2.0)
PARTITION_RANGE = (1.0, 30.0)
DROP_TIMEOUT = 5.0
"""How long a caller waits for a reply that was dropped before giving up."""


class SimLink:
    """Every request crosses the link with :meth:`round_trip`, which may be:

    - delayed (``network_delay``): extra latency drawn from the RNG;
    - dropped (``network_drop``): the caller waits ``DROP_TIMEOUT`` then gets NetworkError;
    - cut (``network_partition``): the link is down for a while; calls fail at once.
    """

    def __init__(self, rng: SimRng, faults: FaultInjector = NO_FAULTS) -> None:
        self._rng = rng
        self._faults = faults
        self.partitioned_until = 0.0

    async def round_trip(self, operation: str) -> None:
        """Carry one request and its reply, or raise :class:`NetworkError`."""
        now = asyncio.get_running_loop().time()
        if now < self.partitioned_until:
            remaining = self.partitioned_until - now
            raise NetworkError(f"{operation}: link partitioned (for {remaining:.1f}s more)")
        if self._faults.check(Fault.NETWORK_PARTITION, operation):
            self.partitioned_until = now + self._rng.uniform(*PARTITION_RANGE)
            raise NetworkError(f"{operation}: link partitioned")
        latency = self._rng.uniform(*BASE_LATENCY)
        if self._faults.check(Fault.NETWORK_DELAY, operation):
            latency += self._rng.uniform(*DELAY_RANGE)
        if self._faults.check(Fault.NETWORK_DROP, operation):
            await asyncio.sleep(DROP_TIMEOUT)
            raise NetworkError(f"{operation}: no reply within {DROP_TIMEOUT:g}s (message dropped)")
        await asyncio.sleep(latency)
