"""The teleports a daemon is running now, as a dashboard or ``kelpie`` client watches them.

The :class:`Teleporter` tells :class:`Flights` each step it takes; readers take a list
(:meth:`Flights.now`) or wait for the next change (``Flights.changes``), so a watcher
is woken by progress, not by a timer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kelpie._changes import Changes
from kelpie.api import TeleportInFlight, TeleportMode, TeleportProgress


@dataclasses.dataclass
class Flight:
    """One teleport running here: where it goes, its last step and when the guest paused."""

    id: str
    sandbox_id: str
    sandbox_name: str
    target: str
    mode: TeleportMode
    started_at: float
    sent: Callable[[], int]
    """Bytes the transfer has sent so far (blobs and, once done, a live migration's)."""
    last: TeleportProgress = dataclasses.field(
        default_factory=lambda: TeleportProgress(phase="prepare", message="starting"))
    paused_at: float | None = None


class Flights:
    """The teleports this process runs now, and a way to wait for their next change."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._flights: dict[str, Flight] = {}
        self.changes = Changes()
        """Bumped at every start, step, pause and end (what followers wait on)."""

    def start(self, flight: Flight) -> None:
        self._flights[flight.id] = flight
        self._bump()

    def step(self, teleport_id: str, step: TeleportProgress) -> None:
        flight = self._flights.get(teleport_id)
        if flight is not None:
            flight.last = step
            self._bump()

    def paused(self, teleport_id: str, at: float) -> None:
        flight = self._flights.get(teleport_id)
        if flight is not None:
            flight.paused_at = at
            self._bump()

    def end(self, teleport_id: str) -> None:
        if self._flights.pop(teleport_id, None) is not None:
            self._bump()

    def __contains__(self, teleport_id: object) -> bool:
        return teleport_id in self._flights

    def now(self) -> list[TeleportInFlight]:
        """Each teleport running here, oldest first."""
        at = self._clock()
        return [_report(f, at) for f in sorted(self._flights.values(),
                                               key=lambda f: (f.started_at, f.id))]

    def _bump(self) -> None:
        self.changes.bump()


def _report(flight: Flight, at: float) -> TeleportInFlight:
    last = flight.last
    # a live migration reports the RAM it moved as it goes; the sender counts it at the end
    moved = flight.sent() + (last.done if last.phase == "live" else 0)
    elapsed = max(at - flight.started_at, 1e-9)
    return TeleportInFlight(
        id=flight.id, sandbox_id=flight.sandbox_id, sandbox_name=flight.sandbox_name,
        target=flight.target, mode=flight.mode, phase=last.phase, message=last.message,
        done=last.done, total=last.total, bytes_sent=moved, started_at=flight.started_at,
        rate_bytes_per_s=moved / elapsed,
        paused_s=None if flight.paused_at is None else max(0.0, at - flight.paused_at))
