"""The crash points of the teleport scenario: every durable step of either side.

A teleport's steps are the phases its two journals record (see
:mod:`kelpie.teleport._journal`): the source's ``preparing`` ... ``done`` / ``aborted``
and the target's ``reserved`` ... ``owned`` / ``discarded``. A crash point is one of them,
on its side, with the host dying just before the record lands or just after it. Seed ``s``
crashes at ``TELEPORT_CRASH_POINTS[s % len(TELEPORT_CRASH_POINTS)]``, the first time its
step is recorded (in a teleport, a roll-back or a recovery), so any
``len(TELEPORT_CRASH_POINTS)`` consecutive seeds crash at every one. Crashes at storage
steps (each chunk written, each snapshot file) come on top, from the ``crash_before_write``
and ``crash_after_write`` faults.
"""

from __future__ import annotations

import dataclasses
import enum

from kelpie.sim import CrashWhen
from kelpie.teleport import SourcePhase, TargetPhase


class Side(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"


@dataclasses.dataclass(frozen=True)
class TeleportCrashPoint:
    """Crash the host on ``side`` when it records ``phase`` (``when``: before or after)."""

    side: Side
    phase: str
    when: CrashWhen

    def __str__(self) -> str:
        return f"{self.side.value} {self.phase}:{self.when.value}"


TELEPORT_CRASH_POINTS: tuple[TeleportCrashPoint, ...] = tuple(
    TeleportCrashPoint(side, phase.value, when)
    for side, phases in ((Side.SOURCE, tuple(SourcePhase)), (Side.TARGET, tuple(TargetPhase)))
    for phase in phases
    for when in CrashWhen
)


def teleport_crash_point_for(seed: int) -> TeleportCrashPoint:
    """The crash point seed ``seed`` takes."""
    return TELEPORT_CRASH_POINTS[seed % len(TELEPORT_CRASH_POINTS)]
