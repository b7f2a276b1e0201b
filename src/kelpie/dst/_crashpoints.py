"""The crash points of the runtime scenario: every storage step of every operation, listed.

A crash point is an operation, the index of one of its storage steps (1-based) and whether
the host dies just before that step lands or just after. Seed ``s`` crashes at
``CRASH_POINTS[s % len(CRASH_POINTS)]``, so any ``len(CRASH_POINTS)`` consecutive seeds
crash at every point, whatever the fault probabilities. The step counts are what the real
runtime does on the mock backend (the simulation reports a step beyond them as a
violation, so a new step cannot go unenumerated):

- ``create`` / ``restore``: 1, the sandbox's own directory (after its record is written);
- ``snapshot``: 6, the snapshots directory, then the backend's writer: remove a stale
  partial, make the partial directory, write the blob, write the manifest, rename into
  place (the record is written after the last one); and a 7th when the VM fails after its
  snapshot was written (e.g. it dies while resuming): the unrecorded directory is removed.
  That point comes with a planned fault (the VM crashes when it resumes) so it is taken;
- ``remove``: 1, the sandbox's directory (its record is deleted after it);
- ``delete_snapshot``: 2, rename to the trash, remove the trash (the record is deleted
  between them);
- ``open``: recovery when the runtime opens, one step per leftover. It has leftovers only
  after an earlier crash, so these points come with a *primer*: a first crash that leaves a
  partial snapshot (removed by recovery) or a trashed but still recorded one (put back by
  recovery), then the crash in the recovery itself.
"""

from __future__ import annotations

import dataclasses

from kelpie.sim import CrashWhen, Fault

OPERATION_STEPS: dict[str, int] = {
    "create": 1,
    "restore": 1,
    "snapshot": 7,
    "remove": 1,
    "delete_snapshot": 2,
}
"""Storage steps of each operation that has any (every other operation has none)."""

RECOVERY = "open"


@dataclasses.dataclass(frozen=True)
class CrashPoint:
    """Crash the host at ``step`` of ``operation`` (``when``: just before or after it);
    with a ``primer``, crash there first (to leave something for recovery to settle); with
    a ``fault`` (a fault and the check it fires at), make the operation fail that way, so
    that it takes the failure path the step is on."""

    operation: str
    step: int
    when: CrashWhen
    primer: CrashPoint | None = None
    fault: tuple[Fault, str] | None = None

    def __str__(self) -> str:
        point = f"{self.operation}#{self.step}:{self.when.value}"
        if self.fault is not None:
            point += f" ({self.fault[0].value} at {self.fault[1]})"
        return point if self.primer is None else f"{point} (after {self.primer})"


FAILURE_PATHS: dict[tuple[str, int], tuple[Fault, str]] = {
    ("snapshot", 7): (Fault.CRASH, "resume"),
}
"""Steps taken only when an operation fails: the fault that makes it fail there."""


def _enumerate() -> tuple[CrashPoint, ...]:
    points = [CrashPoint(op, step, when, fault=FAILURE_PATHS.get((op, step)))
              for op, steps in OPERATION_STEPS.items()
              for step in range(1, steps + 1)
              for when in CrashWhen]
    primers = (
        CrashPoint("snapshot", 5, CrashWhen.AFTER),  # a partial snapshot with its manifest
        CrashPoint("delete_snapshot", 1, CrashWhen.AFTER),  # trashed, still recorded
    )
    points += [CrashPoint(RECOVERY, 1, when, primer) for primer in primers for when in CrashWhen]
    return tuple(points)


CRASH_POINTS = _enumerate()
"""Every crash point, in a fixed order."""


def crash_point_for(seed: int) -> CrashPoint:
    """The crash point seed ``seed`` exercises."""
    return CRASH_POINTS[seed % len(CRASH_POINTS)]
